"""The metrics port after real requests on the demo engine: each value moves by what the requests did
(token counters equal usage, histograms count tokens and calls, gauges follow a stream and a queue),
read from the /metrics text a Prometheus scraper gets."""

import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import LiveServer
from mistral_grpc.client import ChatClient
from mistral_grpc.engine.args import EngineArgs
from mistral_grpc.engine.engine import LLMEngine
from mistral_grpc.server.app import ServeOptions


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(loop) -> Iterator[LiveServer]:
    """The demo model on one sequence at a time, so a second request has to wait."""
    engine = LLMEngine(EngineArgs(device="cpu", kv_cache_memory=2 * 2**20, max_batch_size=1))
    live = LiveServer(engine, loop, ServeOptions(host="localhost", port=0, metrics_port=free_port())).start()
    yield live
    live.stop()


def scrape(server: LiveServer) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} as served on the metrics port."""
    url = f"http://localhost:{server.options.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_counters_and_histograms_follow_the_requests(server: LiveServer) -> None:
    before = scrape(server)
    with ChatClient(server.target, timeout=120) as client:
        one = client.chat("Count the tokens.", max_tokens=12, seed=1, temperature=1)
        two = client.chat("And these, twice.", max_tokens=7, n=2, seed=2, temperature=1)
    after = scrape(server)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    prompt = one.usage.prompt_tokens + two.usage.prompt_tokens
    generated = one.usage.completion_tokens + two.usage.completion_tokens
    assert generated > 3 and prompt > 0
    assert moved("mistral_grpc_prompt_tokens_total") == prompt
    assert moved("mistral_grpc_generation_tokens_total") == generated
    # The first token of each request, then every later token of each choice.
    assert moved("mistral_grpc_time_to_first_token_seconds_count") == 2
    choices = len(one.choices) + len(two.choices)
    assert moved("mistral_grpc_inter_token_latency_seconds_count") == generated - choices
    assert moved("mistral_grpc_inter_token_latency_seconds_sum") > 0
    assert moved("mistral_grpc_requests_total", rpc="Chat", code="OK") == 2
    assert moved("mistral_grpc_request_duration_seconds_count", rpc="Chat") == 2
    assert value(after, "mistral_grpc_kv_cache_blocks_total") > 0


def test_gauges_follow_a_stream_and_a_queued_request(server: LiveServer) -> None:
    assert value(scrape(server), "mistral_grpc_kv_cache_blocks_used") == 0
    seen = {"blocks": 0.0, "running": 0.0, "waiting": 0.0}
    first_chunk = threading.Event()

    def stream() -> None:
        with ChatClient(server.target, timeout=120) as client:
            for _ in client.stream_chat("Stream for a while.", max_tokens=200, seed=3, temperature=1):
                first_chunk.set()

    def watch() -> None:
        samples = scrape(server)
        seen["blocks"] = max(seen["blocks"], value(samples, "mistral_grpc_kv_cache_blocks_used"))
        seen["running"] = max(seen["running"], value(samples, "mistral_grpc_running_requests"))
        seen["waiting"] = max(seen["waiting"], value(samples, "mistral_grpc_waiting_requests"))

    streamer = threading.Thread(target=stream)
    streamer.start()
    assert first_chunk.wait(60)
    with ChatClient(server.target, timeout=120) as client:
        queued = threading.Thread(target=client.chat, args=("Wait your turn.",), kwargs={"max_tokens": 2})
        queued.start()
        while streamer.is_alive() and seen["waiting"] == 0:
            watch()
        queued.join()
    streamer.join()
    assert seen["blocks"] > 0 and seen["running"] == 1
    assert seen["waiting"] == 1  # max_batch_size=1: the second request queued behind the stream
    wait_for(lambda: value(scrape(server), "mistral_grpc_kv_cache_blocks_used") == 0)
    after = scrape(server)
    assert value(after, "mistral_grpc_running_requests") == value(after, "mistral_grpc_waiting_requests") == 0
