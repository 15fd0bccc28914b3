"""SIGTERM drains a server process: health NOT_SERVING, new calls UNAVAILABLE, running streams
finish within the grace period, exit status 0. Streams cut at the end of the grace period, or by a
second signal (which ends the process at once), get UNAVAILABLE saying why; a signal while the model
loads stops the process without waiting for the load."""

import os
import signal
import subprocess
import sys
import time
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
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "ran past the 0.5 s the server gives running calls to finish" in raised.value.details()
    assert server.process.wait(timeout=30) == 0


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_during_the_drain_stops_at_once(server_process, second):
    server = server_process(step_delay=0.05, grace_period=60)
    with ChatClient(server.target) as client:
        stream = client.stream_chat("Hello!")
        next(stream)
        server.process.send_signal(signal.SIGTERM)
        server.wait_for_log("draining")
        next(stream)  # the drain lets it go on
        sent = time.monotonic()
        server.process.send_signal(second)
        with pytest.raises(grpc.RpcError) as raised:
            list(stream)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "a second stop signal ended the drain early" in raised.value.details()
    assert server.process.wait(timeout=30) == 128 + second
    assert time.monotonic() - sent < 10  # not the 60 s grace, nor the 100 steps of 0.05 s left to stream


def test_a_signal_while_the_model_loads_stops_without_waiting_for_the_load():
    """The demo model takes seconds to build; the process must not wait for it."""
    serve = subprocess.Popen([sys.executable, "-m", "mistral_grpc.cli", "serve", "--device", "cpu", "--host",
                              "localhost", "--port", "0"], stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        log = []
        for line in serve.stderr:
            log.append(line)
            if "loading the model" in line:
                break
        serve.send_signal(signal.SIGTERM)
        log += serve.stderr.readlines()
        assert serve.wait(timeout=60) == 0, "".join(log)
    finally:
        if serve.poll() is None:
            serve.kill()
    text = "".join(log)
    assert "stop requested while loading" in text and "stopped" in text
    assert "loaded" not in text and "SERVING" not in text, text  # it left before the load finished
