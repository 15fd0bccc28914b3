"""End to end on the real engine and the demo model (CPU): grpcurl with a seed body, the Python and
Node.js clients, usage counts, seeds, stops, logprobs, deadlines, cancellation and concurrency that
leave the engine holding zero KV blocks, and `mistral-grpc serve` itself under SIGTERM."""

import json
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

import seed_bodies
from harness import LiveServer, ServerProcess, demo_server
from mistral_grpc.client import ChatClient, field_violations
from mistral_grpc.tokenizer import ChatMessage
from external_clients import GRPCURL, NODE, NPM, grpcurl, json_stream, node_stream

# 512 KiB of KV cache: a 256-token context, so even a reply that runs to the context's end is quick.
KV_CACHE = 512 * 2**10
CHAT = "mistral.chat.v1.ChatService/Chat"


@pytest.fixture(scope="module")
def demo(loop):
    with demo_server(loop, kv_cache_memory=KV_CACHE, max_batch_size=8,
                     served_model_name=seed_bodies.SERVED_MODEL) as server:
        yield server


@pytest.fixture
def client(demo):
    with ChatClient(demo.target, timeout=60) as client:
        yield client
    wait_for(lambda: demo.engine.kv_blocks_used() == 0)


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def prompt_tokens(demo: LiveServer, text: str) -> int:
    return len(demo.engine.tokenizer.encode_chat([ChatMessage(role="user", content=text)]))


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl is not installed")
def test_grpcurl_hello_body_runs_to_the_end_of_the_context(demo):
    done = grpcurl(demo.target, CHAT, body=seed_bodies.HELLO)
    assert done.returncode == 0, done.stderr
    response = json.loads(done.stdout)
    usage, [choice] = response["usage"], response["choices"]
    assert usage["prompt_tokens"] == prompt_tokens(demo, "Hello!")
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":  # no max_tokens: the rest of the context
        assert usage["total_tokens"] == demo.engine.max_model_len
    assert choice["message"]["role"] == "assistant" and response["model"] == seed_bodies.SERVED_MODEL


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl is not installed")
def test_grpcurl_stream_body_with_max_tokens(demo):
    body = json.loads(seed_bodies.STREAM) | {"max_tokens": 6, "temperature": 0}
    done = grpcurl(demo.target, "mistral.chat.v1.ChatService/StreamChat", body=json.dumps(body))
    assert done.returncode == 0, done.stderr
    chunks = json_stream(done.stdout)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] == 6 and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_stream_is_the_whole_reply_in_pieces(demo, client):
    whole = client.chat("Tell me a story", temperature=0, max_tokens=12)
    chunks = list(client.stream_chat("Tell me a story", temperature=0, max_tokens=12))
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage == whole.usage
    assert whole.usage.prompt_tokens == prompt_tokens(demo, "Tell me a story")
    assert whole.usage.completion_tokens == 12 and whole.choices[0].finish_reason == "length"


def test_a_seed_repeats_its_reply(client):
    first, again = (client.chat("Seeded", temperature=1.0, top_p=0.9, seed=7, max_tokens=10) for _ in range(2))
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.id != again.id


def test_n_choices_and_logprobs(client):
    response = client.chat("Hi", n=3, max_tokens=5, temperature=1.0, seed=3, logprobs=True, top_logprobs=3)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert response.usage.completion_tokens == sum(len(c.logprobs.content) for c in response.choices)
    for choice in response.choices:
        assert choice.finish_reason in ("stop", "length")
        assert all(e.logprob <= 0 and len(e.top_logprobs) == 3 for e in choice.logprobs.content)


def test_logprob_tokens_concatenate_to_the_content(client):
    """The first token's leading space is dropped from content, so its logprob entry (and the
    alternatives at that place) drop it too."""
    response = client.chat("Tell me a story", n=4, max_tokens=12, temperature=1.0, seed=11, logprobs=True, top_logprobs=2)
    for choice in response.choices:
        entries = choice.logprobs.content
        content = choice.message.content
        assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace") == content
        if "\ufffd" not in content:
            assert "".join(e.token for e in entries) == content
        assert not any(t.token.startswith(" ") for t in entries[0].top_logprobs)


def test_a_stop_string_cuts_the_reply_before_it(client):
    text = client.chat("Count with me", temperature=0, max_tokens=16).choices[0].message.content
    stop = text[3:6]
    assert stop, f"the greedy reply is too short to cut: {text!r}"
    response = client.chat("Count with me", temperature=0, max_tokens=16, stop=[stop])
    assert response.choices[0].message.content == text[:text.find(stop)]
    assert response.choices[0].finish_reason == "stop"


def test_prompt_plus_max_tokens_beyond_the_context(demo, client):
    with pytest.raises(grpc.RpcError) as raised:
        client.chat("Hi", max_tokens=demo.engine.max_model_len)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = field_violations(raised.value)
    assert field == "max_tokens"
    assert str(prompt_tokens(demo, "Hi")) in description and str(demo.engine.max_model_len) in description


def test_deadline_and_cancellation_free_the_kv_blocks(demo, client):
    with pytest.raises(grpc.RpcError) as raised:
        client.chat("Hello!", timeout=0.2)  # the rest of the context: far longer than 0.2 s
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: demo.engine.kv_blocks_used() == 0)
    for i, _ in enumerate(client.stream_chat("Hello!")):
        if i == 3:
            assert demo.engine.kv_blocks_used() > 0
            break
    wait_for(lambda: demo.engine.kv_blocks_used() == 0)


def test_concurrent_calls_with_cancellations(demo):
    with ChatClient(demo.target) as client:
        expected = client.chat("Same prompt", temperature=0, max_tokens=8).choices[0].message.content

    def call(i: int) -> str:
        with ChatClient(demo.target) as client:
            try:
                if i % 3 == 0:
                    return client.chat("Same prompt", temperature=0, max_tokens=8).choices[0].message.content
                if i % 3 == 1:
                    return "".join(client.stream_text("Same prompt", temperature=0, max_tokens=8))
                return client.chat(f"Other prompt {i}", timeout=0.05 + 0.05 * (i % 4)).choices[0].message.content
            except grpc.RpcError as error:
                return error.code().name

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(call, range(24)))
    assert results[0::3] == [expected] * 8 and results[1::3] == [expected] * 8
    assert set(results[2::3]) == {"DEADLINE_EXCEEDED"}
    wait_for(lambda: demo.engine.kv_blocks_used() == 0)


@pytest.mark.skipif(NODE is None or NPM is None, reason="Node.js and npm are not installed")
def test_node_client_on_the_demo(demo, node_client):
    with ChatClient(demo.target) as client:
        expected = client.chat("Hello!", temperature=0, max_tokens=8).choices[0].message.content
    body = json.dumps({"messages": [{"role": "user", "content": "Hello!"}], "temperature": 0, "max_tokens": 8})
    code, chunks = node_stream(node_client, demo.target, body)
    assert code == 0
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == expected
    assert chunks[-1]["usage"]["completion_tokens"] == 8


def test_mistral_grpc_serve_answers_then_drains_on_sigterm():
    server = ServerProcess(["-m", "mistral_grpc.cli", "serve", "--host", "localhost", "--port", "0",
                            "--device", "cpu", "--kv-cache-memory", str(KV_CACHE)])
    try:
        chat = subprocess.run([sys.executable, "-m", "mistral_grpc.cli", "chat", "Hello!", "--target",
                               server.target, "--max-tokens", "4", "--usage"],
                              env=server.env, capture_output=True, text=True, timeout=120)
        assert chat.returncode == 0, chat.stderr
        assert "completion_tokens=4" in chat.stderr
        with ChatClient(server.target) as client:
            assert client.health() == "SERVING"
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
    finally:
        server.close()


def test_serve_quantization_int4_logs_the_scheme_and_answers_as_the_engine_does(loop):
    """`serve --quantization int4`: the load line names the scheme and the weights' size; a greedy Chat
    equals the in-process engine with the same scheme, and health answers."""
    server = ServerProcess(["-m", "mistral_grpc.cli", "serve", "--host", "localhost", "--port", "0", "--device",
                            "cpu", "--dtype", "bfloat16", "--quantization", "int4", "--kv-cache-memory", str(KV_CACHE)])
    try:
        with ChatClient(server.target) as client:
            assert client.health() == "SERVING"
            served = client.chat("Hello!", temperature=0, max_tokens=8)
        assert served.usage.completion_tokens == 8
        assert any(re.search(r"quantization int4, weights \d+\.\d\d GiB", line) for line in server.lines), server.lines
    finally:
        server.close()
    with demo_server(loop, dtype="bfloat16", quantization="int4", kv_cache_memory=KV_CACHE) as local, \
            ChatClient(local.target) as client:
        expected = client.chat("Hello!", temperature=0, max_tokens=8).choices[0].message.content
    assert served.choices[0].message.content == expected
