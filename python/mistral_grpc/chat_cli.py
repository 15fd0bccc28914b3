"""`mistral-grpc chat "Hello!"`: one exchange with a running server, the reply streamed to the terminal."""

import argparse
import math
import os
import sys
from pathlib import Path

import grpc

from mistral_grpc.argtypes import whole_number
from mistral_grpc.client import ChatClient, check_api_key, field_violations

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def _finite(text: str) -> float:
    """An argparse type for a float field: a number, not nan or inf (float() takes both)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
    return value


def _seconds(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds (got {text})")
    return value


_int32 = whole_number(-(2**31), INT32_MAX, "a 32-bit integer")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="send one message to a running server",
                                   description="Send one user message and print the reply as it is made.")
    parser.add_argument("message", help="the user message")
    parser.add_argument("--system", help="a system message to send first")
    parser.add_argument("--target", default="localhost:50051", help="server address (default %(default)s)")
    parser.add_argument("--model", help="the model name to ask for (default: whatever the server serves)")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                        help="print the reply as it is made (default) or all at once")
    parser.add_argument("--usage", action="store_true", help="print the token counts to stderr at the end")
    parser.add_argument("--timeout", type=_seconds, help="deadline of the call in seconds (more than 0)")
    # Each type refuses what the request's field cannot hold (a usage error, not a traceback); the
    # server checks the ranges.
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=_finite, help="[0, 2]; 0 = greedy (server default 1)")
    sampling.add_argument("--top-p", type=_finite, help="(0, 1] (default 1)")
    sampling.add_argument("--top-k", type=_int32, help="0 = off (default)")
    sampling.add_argument("--max-tokens", type=_int32, help="default: what is left of the context")
    sampling.add_argument("--stop", action="append", help="a stop string (repeatable, up to 16)")
    sampling.add_argument("--seed", type=whole_number(-(2**63), INT64_MAX, "a 64-bit integer"),
                          help="same seed + same request = same reply")
    sampling.add_argument("--presence-penalty", type=_finite, help="[-2, 2]")
    sampling.add_argument("--frequency-penalty", type=_finite, help="[-2, 2]")
    sampling.add_argument("--repetition-penalty", type=_finite, help="(0, 10], > 1 penalizes repeats")
    security = parser.add_argument_group("security")
    security.add_argument("--api-key-file", help="file holding the API key (or set MISTRAL_GRPC_API_KEY)")
    security.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
    security.add_argument("--ca-cert", help="connect with TLS, trusting this PEM certificate")
    parser.set_defaults(run=run)


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C

SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "max_tokens", "stop", "seed", "presence_penalty",
                  "frequency_penalty", "repetition_penalty")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt:  # Ctrl-C: leaving the client's `with` cancelled the call; no traceback
        print(file=sys.stderr)
        # Leave at once: at interpreter exit grpc's channel thread may still be winding the cancelled
        # call down, and it printed "Exception in thread ... (_run)" with a cut traceback (1 CI run of ~20).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)


def _run(args: argparse.Namespace) -> int:
    try:
        api_key = (Path(args.api_key_file).read_text().strip() if args.api_key_file
                   else os.environ.get("MISTRAL_GRPC_API_KEY"))
        root_certificates = Path(args.ca_cert).read_bytes() if args.ca_cert else None
        if api_key:
            check_api_key(api_key, f"the API key in {args.api_key_file}" if args.api_key_file
                          else "the API key in MISTRAL_GRPC_API_KEY")
    except OSError as error:
        print(f"error: cannot read {error.filename}: {error.strerror}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.message}]
    fields = {name: getattr(args, name) for name in SAMPLING_FLAGS} | {"model": args.model}
    with ChatClient(args.target, api_key=api_key, tls=args.tls, root_certificates=root_certificates,
                    timeout=args.timeout) as client:
        try:
            usage = _stream(client, messages, fields) if args.stream else _whole(client, messages, fields)
        except grpc.RpcError as error:
            print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
            for field, description in field_violations(error):
                print(f"  {field}: {description}", file=sys.stderr)
            return 1
    if args.usage:
        print(f"prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens} "
              f"total_tokens={usage.total_tokens}", file=sys.stderr)
    return 0


def _stream(client: ChatClient, messages: list[dict], fields: dict):
    usage = None
    for chunk in client.stream_chat(messages, **fields):
        for choice in chunk.choices:
            sys.stdout.write(choice.delta.content)
        sys.stdout.flush()
        if chunk.HasField("usage"):
            usage = chunk.usage
    sys.stdout.write("\n")
    return usage


def _whole(client: ChatClient, messages: list[dict], fields: dict):
    response = client.chat(messages, **fields)
    print(response.choices[0].message.content)
    return response.usage
