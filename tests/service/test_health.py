"""What the probes see: grpc.health.v1 for "" and ChatService (readiness) turns NOT_SERVING when SIGTERM
starts the drain, "liveness" stays SERVING until the process is gone, and the healthcheck module (the
image's HEALTHCHECK) exits 0 exactly when the service it asks about is SERVING."""

import contextlib
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import ServerProcess
from mistral_grpc.client import ChatClient
from mistral_grpc.server import healthcheck
from mistral_grpc.server.app import CHAT_SERVICE, LIVENESS_SERVICE

SERVE_FAKE = Path(__file__).resolve().parents[1] / "server" / "serve_fake.py"


def fake_server_process() -> contextlib.closing[ServerProcess]:
    """The fake engine's server in its own process: 100 tokens 30 ms apart, 30 s of grace."""
    return contextlib.closing(ServerProcess([str(SERVE_FAKE), "0.03", "30"]))


@pytest.fixture(scope="module")
def serving():
    with fake_server_process() as server:
        yield server


@pytest.fixture
def fake_server():
    """One for a test that stops it."""
    with fake_server_process() as server:
        yield server


def probe(target: str, service: str) -> int:
    return healthcheck.main([target, "--service", service, "--timeout", "10"])


def test_healthcheck_exits_0_only_for_serving_services(serving, capsys):
    target = serving.target
    assert [probe(target, service) for service in ("", CHAT_SERVICE, LIVENESS_SERVICE)] == [0, 0, 0]
    assert probe(target, "no.such.Service") == 1
    assert "NOT_FOUND" in capsys.readouterr().out


def test_healthcheck_runs_as_a_plain_file_without_torch(serving):
    # As the image's HEALTHCHECK runs it: a file, importing neither the package nor torch (-X importtime lists
    # every module imported).
    done = subprocess.run([sys.executable, "-X", "importtime", healthcheck.__file__, serving.target],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{serving.target} (server): SERVING"
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()]
    assert "grpc" in imported and not [name for name in imported if name.startswith(("mistral_grpc", "torch"))]


def test_draining_turns_readiness_off_and_keeps_liveness_on(fake_server, capsys):
    target = fake_server.target
    with ChatClient(target) as client, grpc.insecure_channel(target) as channel:
        liveness_watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE))
        assert next(liveness_watch).status == health_pb2.HealthCheckResponse.SERVING
        stream = client.stream_chat("Hello!")
        first = next(stream)
        fake_server.process.send_signal(signal.SIGTERM)
        fake_server.wait_for_log("draining")
        assert probe(target, "") == 1 and probe(target, CHAT_SERVICE) == 1
        assert "NOT_SERVING" in capsys.readouterr().out
        assert probe(target, LIVENESS_SERVICE) == 0
        chunks = [first, *stream]
        assert chunks[-1].choices[0].finish_reason == "stop"
    assert fake_server.process.wait(timeout=30) == 0
    assert probe(target, LIVENESS_SERVICE) == 1  # nothing listens any more
    assert "UNAVAILABLE" in capsys.readouterr().out
