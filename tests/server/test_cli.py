"""`mistral-grpc chat` against a live server, and `mistral-grpc serve` flags -> engine and server settings."""

import pytest

from fake_engine import FakeEngine, choice_text
from mistral_grpc import cli
from mistral_grpc.engine.args import EngineArgs
from mistral_grpc.server import cli as serve_cli


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

    class Engine(FakeEngine):
        @classmethod
        def from_args(cls, args: EngineArgs) -> "Engine":
            built["engine_args"] = args
            return cls()

    async def serve(engine, options):
        built["options"] = options

    monkeypatch.setattr(serve_cli, "LLMEngine", Engine)
    monkeypatch.setattr(serve_cli, "serve", serve)
    (tmp_path / "key").write_text("s3cret\n")
    (tmp_path / "cert.pem").write_bytes(b"CERT")
    (tmp_path / "key.pem").write_bytes(b"KEY")
    assert cli.main(["serve", "--model", "/models/Mistral-7B-Instruct-v0.3", "--port", "6000", "--host", "127.0.0.1",
                     "--device", "cpu", "--dtype", "bfloat16", "--served-model-name", "mistral",
                     "--max-batch-size", "8", "--max-queue", "16", "--kv-cache-memory", "2GiB", "--metrics-port", "9100",
                     "--api-key-file", str(tmp_path / "key"), "--tls-cert", str(tmp_path / "cert.pem"),
                     "--tls-key", str(tmp_path / "key.pem"), "--grace-period", "5"]) == 0
    assert built["engine_args"] == EngineArgs(model="/models/Mistral-7B-Instruct-v0.3", device="cpu", dtype="bfloat16",
                                              served_model_name="mistral", max_batch_size=8, max_queue=16,
                                              kv_cache_memory=2 * 2**30)
    options = built["options"]
    assert (options.host, options.port, options.metrics_port, options.api_key) == ("127.0.0.1", 6000, 9100, "s3cret")
    assert (options.tls_cert, options.tls_key, options.grace_period) == (b"CERT", b"KEY", 5.0)


def test_serve_defaults_to_the_demo_model_on_50051(monkeypatch):
    args = cli.build_parser().parse_args(["serve"])
    assert (args.model, args.port, args.device, args.dtype, args.api_key_file, args.tls_cert) == (
        "demo", 50051, "auto", "auto", None, None)


@pytest.mark.parametrize("flags", [["--tls-cert", "c.pem"], ["--tls-key", "k.pem"]])
def test_serve_wants_both_tls_files(flags):
    with pytest.raises(SystemExit, match="go together"):
        cli.main(["serve", *flags])


def test_serve_rejects_a_bad_size():
    with pytest.raises(SystemExit):
        cli.main(["serve", "--kv-cache-memory", "lots"])

