"""SIGTERM drains a server process: health NOT_SERVING, new calls UNAVAILABLE, running streams
finish within the grace period, exit status 0."""

import signal
from pathlib import Path

import grpc
import pytest

from harness import ServerProcess
from mistral_grpc.client import ChatClient


@pytest.fixture
def server_process():
    processes = []

    def start(step_delay: float, grace_period: float) -> ServerProcess:
        script = Path(__file__).with_name("serve_fake.py")
        processes.append(ServerProcess([str(script), str(step_delay), str(grace_period)]))
        return processes[-1]

    yield start
    for process in processes:
        process.close()


def test_sigterm_lets_running_streams_finish_then_exits_0(server_process):
    server = server_process(step_delay=0.02, grace_period=30)
    with ChatClient(server.target) as client:
        stream = client.stream_chat("Hello!")
        first = next(stream)
        server.process.send_signal(signal.SIGTERM)
        server.wait_for_log("draining")
        assert client.health() == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as raised:
            client.chat("Hello!")
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        chunks = [first, *stream]
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage.completion_tokens == 100
    assert server.process.wait(timeout=30) == 0


def test_sigterm_cancels_streams_that_outlive_the_grace_period(server_process):
    server = server_process(step_delay=0.2, grace_period=0.5)
    with ChatClient(server.target) as client:
        stream = client.stream_chat("Hello!")
        next(stream)
        server.process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as raised:
            list(stream)
        assert raised.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert server.process.wait(timeout=30) == 0
