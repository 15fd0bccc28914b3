"""`mistral-grpc serve`: build the engine from the flags and serve it until SIGTERM."""

import argparse
import asyncio
import logging

from mistral_grpc.engine.args import EngineArgs, parse_bytes
from mistral_grpc.engine.engine import LLMEngine
from mistral_grpc.server.app import ServeOptions, serve
from mistral_grpc.server.auth import read_api_key


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
    engine = parser.add_argument_group("engine")
    engine.add_argument("--max-batch-size", type=int, default=EngineArgs.max_batch_size,
                        help="sequences decoded together in one step (default %(default)s)")
    engine.add_argument("--max-queue", type=int, default=EngineArgs.max_queue,
                        help="waiting requests beyond this get RESOURCE_EXHAUSTED (default %(default)s)")
    engine.add_argument("--kv-cache-memory", type=parse_bytes,
                        help="memory for the KV cache, e.g. 4GiB (default: 85%% of the GPU memory free after "
                             "loading; on CPU 2GiB, or half the available memory if less)")
    network = parser.add_argument_group("network")
    network.add_argument("--host", default="[::]", help="address to listen on (default: all, IPv4 and IPv6)")
    network.add_argument("--port", type=int, default=50051, help="gRPC port (default %(default)s; 0 = any free)")
    network.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port at /metrics")
    network.add_argument("--api-key-file", help="require `authorization: Bearer <key>` with the key in this file")
    network.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key: serve TLS)")
    network.add_argument("--tls-key", help="PEM private key of --tls-cert")
    network.add_argument("--grace-period", type=float, default=ServeOptions.grace_period,
                         help="seconds running calls get to finish after SIGTERM (default %(default)s)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("mistral-grpc serve: --tls-cert and --tls-key go together")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = LLMEngine.from_args(EngineArgs(
        model=args.model, device=args.device, dtype=args.dtype, served_model_name=args.served_model_name,
        max_batch_size=args.max_batch_size, max_queue=args.max_queue, kv_cache_memory=args.kv_cache_memory))
    options = ServeOptions(host=args.host, port=args.port, metrics_port=args.metrics_port,
                           api_key=read_api_key(args.api_key_file) if args.api_key_file else None,
                           tls_cert=_read(args.tls_cert), tls_key=_read(args.tls_key), grace_period=args.grace_period)
    asyncio.run(serve(engine, options))
    return 0


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as file:
        return file.read()
