"""`mistral-grpc serve`: build the engine from the flags and serve it until SIGTERM.

A bad flag is an argparse error (usage, then one line, exit 2); a failure to start (a port in use, a
model that does not load, TLS files that do not go together) is one line on stderr and exit 1, its
traceback only with --log-level DEBUG. A second stop signal during the drain exits 128 + its number.
"""

import argparse
import asyncio
import logging
import os
import sys
from typing import NoReturn

from mistral_grpc.argtypes import whole_number
from mistral_grpc.engine.args import EngineArgs, parse_bytes
from mistral_grpc.engine.engine import LLMEngine
from mistral_grpc.model.linear import QUANTIZATION_SCHEMES, QuantizationError, check_cuda_quantized_kernels
from mistral_grpc.server.app import ServeOptions, StartupError, StoppedBySignal, serve
from mistral_grpc.server.auth import read_api_key

logger = logging.getLogger(__name__)
PROG = "mistral-grpc serve"


def _size(text: str) -> int:
    try:
        value = parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive size, e.g. 512MiB or 4GiB (got {text!r})")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds (got {text})")
    return value


_port = whole_number(0, 65535)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve the model over gRPC",
                                   description="Serve Mistral-7B-Instruct over gRPC (mistral.chat.v1.ChatService).")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="demo",
                       help="a Hugging Face model directory (config.json, model*.safetensors, tokenizer.json), or "
                            "'demo': small random weights with the real Mistral tokenizer (meaningless text)")
    model.add_argument("--served-model-name", help="the name clients give as `model` (default: the directory's "
                                                   "name, or 'demo')")
    model.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    model.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    model.add_argument("--quantization", default=EngineArgs.quantization, choices=QUANTIZATION_SCHEMES,
                       help="quantize the weights while loading them (weight-only; CPU): int8 per output channel, "
                            "int4 in groups of 32 with zero points (default: %(default)s)")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--max-batch-size", type=whole_number(1), default=EngineArgs.max_batch_size,
                        help="sequences decoded together in one step, at least 1 (default %(default)s)")
    # The engine admits max-batch-size + max-queue requests: 0 = none waits beyond a full batch.
    engine.add_argument("--max-queue", type=whole_number(0), default=EngineArgs.max_queue,
                        help="requests that may wait for a place in the batch; beyond this they get "
                             "RESOURCE_EXHAUSTED (default %(default)s; 0 = none wait)")
    engine.add_argument("--kv-cache-memory", type=_size,
                        help="memory for the KV cache, e.g. 4GiB (default: 85%% of the GPU memory free after "
                             "loading; on CPU 2GiB, or half the available memory if less)")
    engine.add_argument("--speculative-tokens", type=whole_number(0), default=EngineArgs.speculative_tokens,
                        metavar="K", help="draft tokens each sequence verifies per step at most, from the request's "
                                          "prediction or prompt lookup; the output never changes (default "
                                          "%(default)s; 0 = no speculation)")
    engine.add_argument("--prompt-lookup", action=argparse.BooleanOptionalAction, default=EngineArgs.prompt_lookup,
                        help="without a prediction, draft what followed the reply's last tokens where they occur "
                             "in the prompt or the reply (default: on)")
    network = parser.add_argument_group("network")
    network.add_argument("--host", default="[::]", help="address to listen on (default: all, IPv4 and IPv6)")
    network.add_argument("--port", type=_port, default=50051, help="gRPC port (default %(default)s; 0 = any free)")
    network.add_argument("--metrics-port", type=_port, help="serve Prometheus metrics on this port at /metrics")
    network.add_argument("--api-key-file", help="require `authorization: Bearer <key>` with the key in this file")
    network.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key: serve TLS)")
    network.add_argument("--tls-key", help="PEM private key of --tls-cert")
    network.add_argument("--grace-period", type=_seconds, default=ServeOptions.grace_period,
                         help="seconds running calls get to finish after SIGTERM (default %(default)s)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.set_defaults(run=run, serve_parser=parser)


def run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser | None = getattr(args, "serve_parser", None)

    def usage_error(message: str) -> NoReturn:
        if parser is None:
            raise SystemExit(f"{PROG}: error: {message}")
        parser.error(message)  # exits 2

    if (args.tls_cert is None) != (args.tls_key is None):
        usage_error("--tls-cert and --tls-key go together")
    if args.quantization != "none" and args.device == "cuda":
        try:
            check_cuda_quantized_kernels(args.quantization)
        except QuantizationError as error:
            usage_error(f"argument --quantization: {error}")
    if args.model != "demo" and not os.path.isdir(args.model):
        usage_error(f"argument --model: no such directory: {args.model!r} (or 'demo' for the demo model)")
    try:
        api_key = read_api_key(args.api_key_file) if args.api_key_file else None
    except (OSError, ValueError) as error:
        usage_error(f"argument --api-key-file: {_reason(error)}")
    try:
        tls_cert, tls_key = _read(args.tls_cert), _read(args.tls_key)
    except OSError as error:
        usage_error(f"argument --tls-cert/--tls-key: {_reason(error)}")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = LLMEngine(EngineArgs(
        model=args.model, device=args.device, dtype=args.dtype, quantization=args.quantization,
        served_model_name=args.served_model_name,
        max_batch_size=args.max_batch_size, max_queue=args.max_queue, kv_cache_memory=args.kv_cache_memory,
        speculative_tokens=args.speculative_tokens, prompt_lookup=args.prompt_lookup))
    options = ServeOptions(host=args.host, port=args.port, metrics_port=args.metrics_port, api_key=api_key,
                           tls_cert=tls_cert, tls_key=tls_key, grace_period=args.grace_period)
    try:
        stopped_while_loading = asyncio.run(serve(engine, options))
    except StoppedBySignal as stopped:
        print(f"{PROG}: {stopped}", file=sys.stderr)
        _leave_now(128 + stopped.signum)
    except Exception as error:  # noqa: BLE001 (a failed start is one line for a person; DEBUG logs the rest)
        logger.debug("startup failed", exc_info=error)
        if isinstance(error, (StartupError, OSError, ValueError)):
            message = _reason(error)
        else:  # not foreseen: name it, and say where the traceback is
            message = f"{type(error).__name__}: {error} (--log-level DEBUG shows the traceback)"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    if stopped_while_loading:
        _leave_now(0)
    return 0


def _leave_now(status: int) -> NoReturn:
    """Exits without waiting for the engine's thread, which may still be loading the model or in a
    step: at interpreter exit a thread inside torch's native code aborts the process."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _reason(error: Exception) -> str:
    """An OSError as "No such file or directory: 'x'" (no "[Errno 2]"); anything else as its message."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename!r}" if error.filename else error.strerror
    return str(error)


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as file:
        return file.read()
