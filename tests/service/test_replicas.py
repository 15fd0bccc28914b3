"""Two `mistral-grpc serve` processes on loopback behind client-side round_robin (the service config of
service/client_service_config.json): calls spread over both, and a SIGTERM on one in the middle of
streaming load fails no call: its running streams finish there, new calls go to the other replica, its
health says NOT_SERVING while it drains, and it exits 0 within the grace period."""

import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mistral_grpc.client import build_request
from mistral_grpc.proto.mistral.chat.v1 import chat_pb2_grpc
from replicas import DemoReplica, balanced_channel, demo_replicas, load

GRACE_PERIOD = 30.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def pair():
    with demo_replicas(2, GRACE_PERIOD) as replicas:
        yield replicas


def answer_from_every_replica(stub: chat_pb2_grpc.ChatServiceStub, replicas: list[DemoReplica]) -> None:
    """round_robin starts with whichever replica is ready first: call until each has answered once."""
    for _ in range(50):
        if all(replica.ok_calls("Chat") for replica in replicas):
            return
        stub.Chat(build_request("Hi", max_tokens=1), timeout=60)
    raise AssertionError("round_robin never reached every replica")


def test_round_robin_alternates_between_the_replicas(pair):
    with balanced_channel(pair) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        answer_from_every_replica(stub, pair)
        before = [replica.ok_calls("Chat") for replica in pair]
        for _ in range(8):
            stub.Chat(build_request("Hello!", max_tokens=2, temperature=0), timeout=60)
    assert [replica.ok_calls("Chat") - calls for replica, calls in zip(pair, before)] == [4, 4]


def test_load_script_reports_every_request_over_both_replicas(pair, capsys):
    targets = [replica.address for replica in pair]
    assert load.main(["--target", *targets, "--streams", "4", "--requests", "8", "--max-tokens", "4"]) == 0
    table = capsys.readouterr().out
    assert "| requests ok             | 8 |" in table and "| requests failed         | 0 |" in table


@pytest.mark.parametrize("target", ["10.0.0.1:50051", "example.com:50051", "0.0.0.0:50051", "[::]:50051"])
def test_load_script_refuses_targets_off_loopback(target):
    with pytest.raises(SystemExit, match="loopback"):
        load.loopback_target(["127.0.0.1:50051", target])


def test_sigterm_on_one_replica_under_streaming_load_fails_no_call():
    with (demo_replicas(2, GRACE_PERIOD) as (draining, staying), balanced_channel([draining, staying]) as channel,
          grpc.insecure_channel(draining.address) as direct):
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        answer_from_every_replica(stub, [draining, staying])
        watch = health_pb2_grpc.HealthStub(direct).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == SERVING
        # Six streams, alternately on each replica; each has sent its first chunk before the SIGTERM.
        streams = [stub.StreamChat(build_request("Tell me a story", max_tokens=120, temperature=0), timeout=120)
                   for _ in range(6)]
        firsts = [next(stream) for stream in streams]
        assert draining.metric("mistral_grpc_running_requests") > 0
        assert staying.metric("mistral_grpc_running_requests") > 0
        chat_calls = staying.ok_calls("Chat")

        draining.process.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING
        for _ in range(6):  # new calls while it drains: none fails, all land on the other replica
            stub.Chat(build_request("Hello!", max_tokens=2), timeout=60)
        assert staying.ok_calls("Chat") - chat_calls == 6

        for first, stream in zip(firsts, streams):
            last = [first, *stream][-1]
            assert last.choices[0].finish_reason in ("stop", "length") and last.HasField("usage")
        assert draining.process.wait(timeout=GRACE_PERIOD) == 0
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
