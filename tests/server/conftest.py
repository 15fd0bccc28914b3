"""Fixtures for the server tests: a fake engine, and real grpc.aio servers on it in a loop thread."""

from pathlib import Path

import pytest

from external_clients import install_node_client
from fake_engine import FakeEngine
from harness import LiveServer, LoopThread


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


@pytest.fixture(scope="session")
def node_client() -> Path:
    """The Node.js client script, its packages installed."""
    return install_node_client()
