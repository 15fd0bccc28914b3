"""`mistral-grpc chat` against a live server, and `mistral-grpc serve` flags -> engine and server settings."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from fake_engine import FakeEngine, choice_text
from mistral_grpc import cli
from mistral_grpc.engine.args import EngineArgs
from mistral_grpc.model import linear
from mistral_grpc.server import cli as serve_cli

LONG = tuple(f" w{i}" for i in range(2000))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))  # the child imports what this process does


def test_chat_streams_the_reply_to_stdout(serve_fake, capsys):
    server = serve_fake(step_delay=0.001)
    assert cli.main(["chat", "Hello!", "--target", server.target, "--temperature", "0", "--max-tokens", "5",
                     "--stop", "xyz", "--seed", "3", "--system", "Be brief.", "--usage"]) == 0
    out, err = capsys.readouterr()
    assert out == "Hello! I\n"  # five pieces, one of them empty
    assert "completion_tokens=5" in err
    params = server.engine.requests[-1].params
    assert (params.temperature, params.max_tokens, params.stop, params.seed) == (0.0, 5, ("xyz",), 3)


def test_chat_without_streaming_and_with_an_api_key(serve_fake, capsys, tmp_path, monkeypatch):
    from mistral_grpc.server.app import ServeOptions

    server = serve_fake(ServeOptions(host="localhost", port=0, api_key="k3y"))
    key_file = tmp_path / "key"
    key_file.write_text("k3y\n")
    assert cli.main(["chat", "Hi", "--target", server.target, "--no-stream", "--api-key-file", str(key_file)]) == 0
    assert capsys.readouterr().out == choice_text(0) + "\n"
    monkeypatch.setenv("MISTRAL_GRPC_API_KEY", "k3y")
    assert cli.main(["chat", "Hi", "--target", server.target]) == 0
    monkeypatch.delenv("MISTRAL_GRPC_API_KEY")
    assert cli.main(["chat", "Hi", "--target", server.target]) == 1
    assert "error: UNAUTHENTICATED" in capsys.readouterr().err


def test_chat_reports_bad_fields(serve_fake, capsys):
    server = serve_fake()
    assert cli.main(["chat", "Hi", "--target", server.target, "--temperature", "5", "--top-p", "0"]) == 1
    err = capsys.readouterr().err
    assert "error: INVALID_ARGUMENT" in err and "  temperature: must be between 0 and 2" in err and "  top_p:" in err


def test_serve_flags_build_the_engine_and_the_server(monkeypatch, tmp_path):
    built = {}

    def engine(args: EngineArgs) -> FakeEngine:
        built["engine_args"] = args
        return FakeEngine()

    async def serve(engine, options):
        built["options"] = options

    monkeypatch.setattr(serve_cli, "LLMEngine", engine)
    monkeypatch.setattr(serve_cli, "serve", serve)
    (tmp_path / "key").write_text("s3cret\n")
    (tmp_path / "cert.pem").write_bytes(b"CERT")
    (tmp_path / "key.pem").write_bytes(b"KEY")
    model = tmp_path / "Mistral-7B-Instruct-v0.3"
    model.mkdir()
    assert cli.main(["serve", "--model", str(model), "--port", "6000", "--host", "127.0.0.1",
                     "--device", "cpu", "--dtype", "bfloat16", "--quantization", "int4",
                     "--served-model-name", "mistral",
                     "--max-batch-size", "8", "--max-queue", "16", "--kv-cache-memory", "2GiB",
                     "--metrics-port", "9100",
                     "--api-key-file", str(tmp_path / "key"), "--tls-cert", str(tmp_path / "cert.pem"),
                     "--tls-key", str(tmp_path / "key.pem"), "--grace-period", "5"]) == 0
    assert built["engine_args"] == EngineArgs(model=str(model), device="cpu", dtype="bfloat16", quantization="int4",
                                              served_model_name="mistral", max_batch_size=8, max_queue=16,
                                              kv_cache_memory=2 * 2**30)
    options = built["options"]
    assert (options.host, options.port, options.metrics_port, options.api_key) == ("127.0.0.1", 6000, 9100, "s3cret")
    assert (options.tls_cert, options.tls_key, options.grace_period) == (b"CERT", b"KEY", 5.0)


def test_serve_defaults_to_the_demo_model_on_50051(monkeypatch):
    args = cli.build_parser().parse_args(["serve"])
    assert (args.model, args.port, args.device, args.dtype, args.api_key_file, args.tls_cert) == (
        "demo", 50051, "auto", "auto", None, None)


def _usage_error(flags: list[str], capsys) -> str:
    """The one-line error of `serve FLAGS` rejected as argparse rejects a flag (usage, then the line, exit 2)."""
    with pytest.raises(SystemExit) as raised:
        cli.main(["serve", *flags])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: mistral-grpc serve") and "Traceback" not in err
    return err.splitlines()[-1]


@pytest.mark.parametrize("flags", [["--tls-cert", "c.pem"], ["--tls-key", "k.pem"]])
def test_serve_wants_both_tls_files(flags, capsys):
    assert "go together" in _usage_error(flags, capsys)


@pytest.mark.parametrize("flags, message", [
    (["--kv-cache-memory", "lots"], "argument --kv-cache-memory: not a size: 'lots'"),
    (["--kv-cache-memory", "0"], "argument --kv-cache-memory: must be a positive size"),
    (["--kv-cache-memory=-1GiB"], "argument --kv-cache-memory: must be a positive size"),
    (["--max-batch-size", "0"], "argument --max-batch-size: must be at least 1 (got 0)"),
    (["--max-batch-size", "two"], "argument --max-batch-size: not a whole number: 'two'"),
    (["--max-queue", "-1"], "argument --max-queue: must be at least 0 (got -1)"),
    (["--port", "65536"], "argument --port: must be between 0 and 65535 (got 65536)"),
    (["--port", "-1"], "argument --port: must be between 0 and 65535 (got -1)"),
    (["--metrics-port", "70000"], "argument --metrics-port: must be between 0 and 65535 (got 70000)"),
    (["--grace-period", "-5"], "argument --grace-period: must be 0 or more seconds (got -5)"),
    (["--model", "/no/such/model"], "argument --model: no such directory: '/no/such/model'"),
    (["--quantization", "int2"], "argument --quantization: invalid choice: 'int2'"),
])
def test_serve_rejects_bad_values_at_startup(flags, message, capsys):
    assert _usage_error(flags, capsys).startswith(f"mistral-grpc serve: error: {message}")


def test_quantization_on_cuda_is_a_usage_error_only_without_the_cuda_kernels(monkeypatch, capsys):
    """With the CUDA kernels built, --quantization on CUDA gets past the flags (to the missing model here)."""
    for built in (False, True):
        monkeypatch.setattr(linear, "cuda_quantized_kernels_built", lambda: built)
        error = _usage_error(["--quantization", "int4", "--device", "cuda", "--model", "/no/such/model"], capsys)
        expected = ("argument --quantization: int4 on CUDA needs the extension built with its CUDA kernels "
                    "(this build has the CPU's only)") if not built else "argument --model: no such directory"
        assert error.startswith(f"mistral-grpc serve: error: {expected}")


def test_serve_rejects_a_missing_or_empty_api_key_file(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert _usage_error(["--api-key-file", str(missing)], capsys) == (
        f"mistral-grpc serve: error: argument --api-key-file: No such file or directory: '{missing}'")
    (tmp_path / "empty").write_text("\n")
    assert _usage_error(["--api-key-file", str(tmp_path / "empty")], capsys).endswith("is empty")


def test_serve_accepts_an_empty_queue(monkeypatch):
    built = {}
    monkeypatch.setattr(serve_cli, "LLMEngine", lambda args: built.setdefault("args", args) and FakeEngine())
    monkeypatch.setattr(serve_cli, "serve", lambda engine, options: _nothing())
    assert cli.main(["serve", "--max-queue", "0", "--max-batch-size", "1"]) == 0
    assert (built["args"].max_queue, built["args"].max_batch_size) == (0, 1)


async def _nothing() -> None:
    pass


def _serve_fails(flags: list[str]) -> str:
    """`mistral-grpc serve FLAGS` in its own process: it must exit 1 with one line on stderr (nothing
    else at --log-level ERROR: no traceback, no grpc C-core line, no draining news)."""
    done = subprocess.run([sys.executable, "-m", "mistral_grpc.cli", "serve", "--device", "cpu", "--log-level",
                           "ERROR", *flags], capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 1, done.stderr
    [line] = done.stderr.strip().splitlines()
    return line


def test_serve_start_failures_are_one_line(serve_fake):
    taken = serve_fake().server.port
    assert _serve_fails(["--host", "localhost", "--port", str(taken)]) == (
        f"mistral-grpc serve: error: cannot listen on localhost:{taken} (--host, --port): Address already in use")
    with socket.socket() as metrics:
        metrics.bind(("", 0))
        metrics.listen()
        port = metrics.getsockname()[1]
        assert _serve_fails(["--port", "0", "--metrics-port", str(port)]) == (
            f"mistral-grpc serve: error: cannot serve metrics on port {port} (--metrics-port): Address already in use")
    assert _serve_fails(["--port", "0", "--kv-cache-memory", "1KiB"]).startswith(
        "mistral-grpc serve: error: --kv-cache-memory 1024 bytes holds no KV block")
    assert _serve_fails(["--port", "0", "--dtype", "float16", "--quantization", "int8"]) == (
        "mistral-grpc serve: error: --quantization int8 needs --dtype float32 or bfloat16 on the CPU "
        "(the activations' dtype), got float16")


def test_chat_exits_130_without_a_traceback_on_ctrl_c(serve_fake):
    server = serve_fake(step_delay=0.02, pieces=LONG)
    # SIGINT as a terminal delivers it, even where the tests run in the background: a job started with
    # `&` ignores SIGINT, the child would inherit that, and Python installs no Ctrl-C handler then. So the
    # child installs Python's own handler before it runs the CLI (not a preexec_fn: Python code between
    # fork and exec in this process, which has gRPC's threads, may crash the child before it starts).
    start_cli = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                 "sys.argv[0] = 'mistral-grpc'; runpy.run_module('mistral_grpc.cli', run_name='__main__')")
    chat = subprocess.Popen([sys.executable, "-c", start_cli, "chat", "Hi", "--target", server.target],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert chat.stdout.read(4) == " w0 "  # the reply is streaming
        chat.send_signal(signal.SIGINT)
        out, err = chat.communicate(timeout=30)
    finally:
        if chat.poll() is None:
            chat.kill()
    assert chat.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    deadline = time.monotonic() + 15
    while server.engine.running and time.monotonic() < deadline:  # the call was cancelled
        time.sleep(0.01)
    assert server.engine.running == 0



def test_chat_reports_an_unreadable_key_file_in_one_line(tmp_path, capsys):
    assert cli.main(["chat", "Hi", "--api-key-file", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err == f"error: cannot read {tmp_path / 'missing'}: No such file or directory\n"


def _certificate(directory, name: str):
    """A self-signed certificate and its key, made with the openssl command: (cert path, key path)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_serve_names_bad_tls_files_in_one_line(tmp_path):
    cert, key = _certificate(tmp_path, "a")
    _, other_key = _certificate(tmp_path, "b")
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "text").write_text("not a certificate\n")
    prefix = "mistral-grpc serve: error: cannot serve TLS with --tls-cert and --tls-key: "
    for cert_file, key_file, reason in (
            (cert, other_key, "the private key in --tls-key is not the key of the certificate in --tls-cert"),
            (tmp_path / "text", key, "--tls-cert holds no PEM certificate"),
            (cert, tmp_path / "empty", "--tls-key is empty"),
            (key, cert, "--tls-cert holds no PEM certificate")):
        assert _serve_fails(["--port", "0", "--tls-cert", str(cert_file), "--tls-key", str(key_file)]) == (
            prefix + reason)


@pytest.mark.parametrize("key, byte", [("clé-secrète", "0xc3 at position 2"), ("two\nlines", "0x0a at position 3"),
                                       ("tab\there", "0x09 at position 3")])
def test_serve_refuses_an_api_key_metadata_cannot_carry(tmp_path, capsys, key, byte):
    (tmp_path / "key").write_text(key + "\n")
    error = _usage_error(["--api-key-file", str(tmp_path / "key")], capsys)
    assert error.startswith(f"mistral-grpc serve: error: argument --api-key-file: the API key in {tmp_path / 'key'} "
                            f"holds byte {byte}, which gRPC metadata cannot carry")


def test_chat_refuses_an_api_key_metadata_cannot_carry(monkeypatch, capsys):
    monkeypatch.setenv("MISTRAL_GRPC_API_KEY", "clé")
    assert cli.main(["chat", "Hi"]) == 1
    assert capsys.readouterr().err.startswith(
        "error: the API key in MISTRAL_GRPC_API_KEY holds byte 0xc3 at position 2, which gRPC metadata cannot carry")


@pytest.mark.parametrize("flags, message", [
    (["--max-tokens", "99999999999"], "argument --max-tokens: must be between -2147483648 and 2147483647"),
    (["--top-k", "3000000000"], "argument --top-k: must be between -2147483648 and 2147483647"),
    (["--seed", str(2**63)], "argument --seed: must be between -9223372036854775808 and 9223372036854775807"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number (got nan)"),
    (["--temperature", "inf"], "argument --temperature: must be a finite number (got inf)"),
    (["--top-p=-inf"], "argument --top-p: must be a finite number (got -inf)"),
    (["--repetition-penalty", "NaN"], "argument --repetition-penalty: must be a finite number (got NaN)"),
    (["--timeout", "0"], "argument --timeout: must be more than 0 seconds (got 0)"),
    (["--timeout", "-3"], "argument --timeout: must be more than 0 seconds (got -3)"),
    (["--timeout", "nan"], "argument --timeout: must be a finite number (got nan)"),
    (["--max-tokens", "ten"], "argument --max-tokens: not a whole number: 'ten'"),
])
def test_chat_turns_values_the_request_cannot_hold_into_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(["chat", "Hi", *flags])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith(f"mistral-grpc chat: error: {message}")
