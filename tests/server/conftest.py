"""Fixtures for the server tests: a fake engine, and real grpc.aio servers on it in a loop thread."""

import importlib.util
import sys

import pytest

# Until the real tokenizer lands on main, the server imports this stand-in under its name.
if importlib.util.find_spec("mistral_grpc.tokenizer") is None:
    import fake_tokenizer

    sys.modules["mistral_grpc.tokenizer"] = fake_tokenizer

from fake_engine import FakeEngine  # noqa: E402
from harness import LiveServer, LoopThread  # noqa: E402


@pytest.fixture(scope="session")
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture
def serve_fake(loop):
    """serve_fake(options=None, start=True, **FakeEngine kwargs) -> a LiveServer, stopped after the test."""
    servers = []

    def make(options=None, start: bool = True, **engine_kwargs) -> LiveServer:
        server = LiveServer(FakeEngine(**engine_kwargs), loop, options)
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        server.stop()
