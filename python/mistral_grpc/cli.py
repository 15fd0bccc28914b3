"""The `mistral-grpc` command: `serve` runs the server, `chat` talks to one."""

import argparse

from mistral_grpc import chat_cli
from mistral_grpc.server import cli as serve_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral-grpc",
                                     description="A gRPC microservice serving Mistral-7B-Instruct.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{serve,chat}")
    serve_cli.add_parser(subparsers)
    chat_cli.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
