"""`prediction` through the real server: the reply is what it is without one (content and logprobs, Chat
and StreamChat), usage.completion_tokens_details counts the drafts, bad predictions are
INVALID_ARGUMENT naming the field, and the serve flags reach the engine."""

import json

import grpc
import pytest

from external_clients import GRPCURL, grpcurl
from fake_engine import FakeEngine
from harness import demo_server
from mistral_grpc import cli
from mistral_grpc.client import ChatClient, field_violations
from mistral_grpc.engine.args import EngineArgs
from mistral_grpc.server import cli as serve_cli

KV_CACHE = 512 * 2**10  # a 256-token context
# On the demo model this prompt's greedy reply re-encodes to its own first 10 tokens: a prediction made
# of its text has right drafts to accept.
PROMPT = "Count with me"


@pytest.fixture(scope="module")
def servers(loop):
    with demo_server(loop, kv_cache_memory=KV_CACHE, speculative_tokens=0) as plain, \
            demo_server(loop, kv_cache_memory=KV_CACHE, speculative_tokens=8, prompt_lookup=False) as spec:
        yield plain, spec


@pytest.fixture(scope="module")
def clients(servers):
    plain, spec = servers
    with ChatClient(plain.target, timeout=60) as plain_client, ChatClient(spec.target, timeout=60) as spec_client:
        yield plain_client, spec_client


def logprobs_of(choice) -> list[tuple[str, float]]:
    return [(entry.token, entry.logprob) for entry in choice.logprobs.content]


def test_a_prediction_changes_no_reply_and_usage_counts_its_drafts(servers, clients):
    plain_client, spec_client = clients
    params = dict(temperature=0, max_tokens=40, logprobs=True)
    reference = plain_client.chat(PROMPT, **params)
    content = reference.choices[0].message.content
    for prediction in (content, content[:len(content) // 2] + " something else entirely", "unrelated words"):
        response = spec_client.chat(PROMPT, prediction={"type": "content", "content": prediction}, **params)
        assert response.choices[0].message.content == content
        assert logprobs_of(response.choices[0]) == logprobs_of(reference.choices[0])
        assert response.usage.completion_tokens == reference.usage.completion_tokens == 40
    right = spec_client.chat(PROMPT, prediction={"type": "content", "content": content}, **params)
    details = right.usage.completion_tokens_details
    assert details.accepted_prediction_tokens >= 9  # the 10 tokens the text re-encodes to, less the prefill's
    assert not reference.usage.HasField("completion_tokens_details")  # no drafts, no details
    assert all(server.engine.kv_blocks_used() == 0 for server in servers)


def test_a_streamed_prediction_sends_accepted_tokens_together_and_usage_last(clients):
    plain_client, spec_client = clients
    params = dict(temperature=0, max_tokens=40)
    content = plain_client.chat(PROMPT, **params).choices[0].message.content
    whole = spec_client.chat(PROMPT, prediction={"type": "content", "content": content}, **params)
    chunks = list(spec_client.stream_chat(PROMPT, prediction={"type": "content", "content": content}, **params))
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == content
    assert chunks[-1].usage.completion_tokens_details == whole.usage.completion_tokens_details
    # One chunk per step at most: accepted drafts leave with the token of their step.
    assert len(chunks) <= 40 - whole.usage.completion_tokens_details.accepted_prediction_tokens + 1


@pytest.mark.parametrize("prediction, field", [
    ({"type": "text", "content": "hi"}, "prediction.type"),
    ({"content": "hi"}, "prediction.type"),
    ({"type": "content", "content": " word" * 300}, "prediction.content"),  # 300 tokens, a 256-token context
])
@pytest.mark.parametrize("rpc", ["chat", "stream_chat"])
def test_a_bad_prediction_is_invalid_argument_naming_the_field(serve_fake, prediction, field, rpc):
    server = serve_fake()
    with ChatClient(server.target) as client, pytest.raises(grpc.RpcError) as raised:
        list(getattr(client, rpc)("Hi", prediction=prediction)) if rpc == "stream_chat" else client.chat(
            "Hi", prediction=prediction)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [name for name, _ in field_violations(raised.value)] == [field]
    assert server.engine.requests == []


def test_the_prediction_reaches_the_engine_as_the_reply_would_be_tokenized(serve_fake):
    server = serve_fake()
    with ChatClient(server.target) as client:
        client.chat("Hi", prediction={"type": "content", "content": "Hello there, world"})
        client.chat("Hi", prediction={"type": "content", "content": ""})
        client.chat("Hi")
    with_text, empty, without = server.engine.requests
    assert with_text.prediction == tuple(server.engine.tokenizer.encode("Hello there, world"))
    assert server.engine.tokenizer.decode(list(with_text.prediction)) == "Hello there, world"
    assert empty.prediction is None and without.prediction is None


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl is not installed")
def test_grpcurl_sends_a_prediction_by_its_json_name(servers):
    _, spec = servers
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 12, "temperature": 0,
            "prediction": {"type": "content", "content": "anything"}}
    done = grpcurl(spec.target, "mistral.chat.v1.ChatService/Chat", body=json.dumps(body))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["usage"]["completion_tokens"] == 12


def test_serve_flags_set_speculation(monkeypatch):
    built = {}
    monkeypatch.setattr(serve_cli, "LLMEngine", lambda args: built.setdefault("args", args) and FakeEngine())

    async def serve(engine, options):
        pass

    monkeypatch.setattr(serve_cli, "serve", serve)
    assert cli.main(["serve", "--speculative-tokens", "3", "--no-prompt-lookup"]) == 0
    assert (built["args"].speculative_tokens, built["args"].prompt_lookup) == (3, False)
    defaults = cli.build_parser().parse_args(["serve"])
    assert (defaults.speculative_tokens, defaults.prompt_lookup) == (EngineArgs.speculative_tokens,
                                                                     EngineArgs.prompt_lookup)


def test_a_negative_draft_count_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(["serve", "--speculative-tokens", "-1"])
    assert raised.value.code == 2
    assert "argument --speculative-tokens: must be at least 0 (got -1)" in capsys.readouterr().err
