"""Fixtures for the server tests: a fake engine, and a real grpc.aio server on it in a thread."""

import importlib.util
import sys

import pytest

# Until the real tokenizer lands on main, the server imports this stand-in under its name.
if importlib.util.find_spec("mistral_grpc.tokenizer") is None:
    import fake_tokenizer

    sys.modules["mistral_grpc.tokenizer"] = fake_tokenizer

from fake_engine import FakeEngine  # noqa: E402
from harness import LiveServer  # noqa: E402


@pytest.fixture
def serve_fake():
    """serve_fake(**FakeEngine kwargs, options=ServeOptions) -> a started LiveServer (stopped after the test)."""
    servers = []

    def start(options=None, **engine_kwargs) -> LiveServer:
        server = LiveServer(FakeEngine(**engine_kwargs), options)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()
