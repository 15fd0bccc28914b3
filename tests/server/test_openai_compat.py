"""Bodies copied from OpenAI-style code, through a real server (grpcurl sending the JSON verbatim, or the
Python client): tool_choice "required" and its object form, max_completion_tokens, stream_options,
parallel_tool_calls, user, metadata, store, foreign tool-call ids, created as a JSON number, and a Chat
response too large for one message (docs/openai-compatibility.md)."""

import json
import logging
import re

import grpc
import pytest

from external_clients import GRPCURL, grpcurl, json_stream
from fake_engine import choice_text
from mistral_grpc.client import ChatClient, field_violations
from mistral_grpc.metrics import REGISTRY
from mistral_grpc.proto.mistral.chat.v1 import chat_pb2, chat_pb2_grpc
from mistral_grpc.server import servicer as servicer_module
from mistral_grpc.tokenizer import ToolCall

CHAT = "mistral.chat.v1.ChatService/Chat"
STREAM_CHAT = "mistral.chat.v1.ChatService/StreamChat"
needs_grpcurl = pytest.mark.skipif(GRPCURL is None, reason="grpcurl is not installed")


def weather_tool(name: str = "get_weather") -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


TOOLS = [weather_tool(), weather_tool("get_time")]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def called_names(structured) -> list[str]:
    """The function names a tool-call grammar lets the answer call."""
    schema = json.loads(structured.schema)
    return [call["properties"]["name"]["const"] for call in schema["items"]["anyOf"]]


def counted(rpc: str, code: str) -> float:
    return REGISTRY.get_sample_value("mistral_grpc_requests_total", {"rpc": rpc, "code": code}) or 0.0


@pytest.fixture
def server(serve_fake):
    return serve_fake(max_model_len=4096)


@pytest.fixture
def client(server):
    with ChatClient(server.target) as client:
        yield client


@needs_grpcurl
def test_tool_choice_required_is_any(server):
    done = grpcurl(server.target, CHAT, body=json.dumps({"messages": ASK, "tools": TOOLS, "tool_choice": "required"}))
    assert done.returncode == 0, done.stderr
    structured = server.engine.requests[-1].params.structured
    assert structured.kind == "tool_calls" and called_names(structured) == ["get_weather", "get_time"]
    assert "maxItems" not in json.loads(structured.schema)


@needs_grpcurl
def test_tool_choice_object_forces_that_one_tool(server):
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    done = grpcurl(server.target, CHAT, body=json.dumps(body))
    assert done.returncode == 0, done.stderr
    request = server.engine.requests[-1]
    assert called_names(request.params.structured) == ["get_time"]
    # Both tools are still offered to the model in the prompt; only the answer is constrained.
    prompt = server.engine.tokenizer.decode(request.prompt_token_ids)
    assert '"get_weather"' in prompt and '"get_time"' in prompt


@pytest.mark.parametrize("tool_choice,field", [
    ({"type": "function", "function": {"name": "get_stock"}}, "tool_choice.function.name"),
    ({"type": "function"}, "tool_choice"),
    ({"type": "retrieval", "function": {"name": "get_time"}}, "tool_choice"),
    ({"type": "function", "function": {"name": "get_time", "arguments": "{}"}}, "tool_choice"),
    (["auto"], "tool_choice"),
    (1, "tool_choice"),
    ("sometimes", "tool_choice"),
])
def test_a_bad_tool_choice_is_invalid_argument_naming_it(server, client, tool_choice, field):
    with pytest.raises(grpc.RpcError) as caught:
        client.chat(ASK, tools=TOOLS, tool_choice=tool_choice)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [name for name, _ in field_violations(caught.value)] == [field]
    assert not server.engine.requests


def test_tool_choice_null_is_unset(server):
    body = chat_pb2.ChatRequest(tools=[TOOLS[0]])
    body.messages.add(role="user", content="hi")
    body.tool_choice.null_value = 0  # JSON null
    with grpc.insecure_channel(server.target) as channel:
        chat_pb2_grpc.ChatServiceStub(channel).Chat(body)
    assert server.engine.requests[-1].params.structured is None


def test_the_deprecated_string_field_still_works_on_the_wire(server):
    """A binary client built from the contract before tool_choice took objects sends field 15."""
    body = chat_pb2.ChatRequest(tools=[TOOLS[0]], tool_choice_string="any")
    body.messages.add(role="user", content="hi")
    with grpc.insecure_channel(server.target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        stub.Chat(body)
        assert called_names(server.engine.requests[-1].params.structured) == ["get_weather"]
        body.tool_choice.string_value = "auto"
        with pytest.raises(grpc.RpcError) as caught:
            stub.Chat(body)
    assert [name for name, _ in field_violations(caught.value)] == ["tool_choice"]
    assert "tool_choice_string" in caught.value.details()


def test_max_completion_tokens_is_max_tokens(server, client):
    assert client.chat(ASK, max_completion_tokens=3).usage.completion_tokens == 3
    assert server.engine.requests[-1].params.max_tokens == 3
    assert client.chat(ASK, max_completion_tokens=4, max_tokens=4).usage.completion_tokens == 4
    with pytest.raises(grpc.RpcError) as caught:
        client.chat(ASK, max_completion_tokens=4, max_tokens=5)
    [(field, description)] = field_violations(caught.value)
    assert field == "max_completion_tokens"
    assert "max_tokens 5" in description and "max_completion_tokens 4" in description
    with pytest.raises(grpc.RpcError) as caught:
        client.chat(ASK, max_completion_tokens=0)
    assert [name for name, _ in field_violations(caught.value)] == ["max_completion_tokens"]
    assert len(server.engine.requests) == 2


@needs_grpcurl
def test_the_fields_openai_clients_send_along_are_accepted(server):
    body = {"messages": ASK, "stream": True, "stream_options": {"include_usage": True}, "user": "user-1234",
            "metadata": {"team": "search", "run": "7"}, "store": False, "parallel_tool_calls": True,
            "max_completion_tokens": 50}
    done = grpcurl(server.target, STREAM_CHAT, body=json.dumps(body))
    assert done.returncode == 0, done.stderr
    chunks = json_stream(done.stdout)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == choice_text(0)
    assert chunks[-1]["usage"]["completion_tokens"] == 9 and all("usage" not in c for c in chunks[:-1])
    body["stream_options"] = {"include_usage": False}  # usage comes anyway: documented
    chunks = json_stream(grpcurl(server.target, STREAM_CHAT, body=json.dumps(body)).stdout)
    assert chunks[-1]["usage"]["total_tokens"] > 9


def test_store_true_is_refused(server, client):
    with pytest.raises(grpc.RpcError) as caught:
        client.chat(ASK, store=True)
    [(field, description)] = field_violations(caught.value)
    assert field == "store" and "stores no completions" in description
    assert not server.engine.requests


@needs_grpcurl
def test_created_prints_as_a_json_number(server):
    for rpc in (CHAT, STREAM_CHAT):
        done = grpcurl(server.target, rpc, body=json.dumps({"messages": ASK}))
        created = [chunk["created"] for chunk in json_stream(done.stdout)]
        assert all(isinstance(value, int) and value > 1_700_000_000 for value in created), created


def test_parallel_tool_calls_false_makes_one_call_at_most(serve_fake):
    calls = tuple(ToolCall(id=f"call{i}abcd", name="get_weather", arguments=json.dumps({"city": city}))
                  for i, city in enumerate(("Paris", "Oslo")))
    server = serve_fake(tool_calls=calls)
    with ChatClient(server.target) as client:
        assert len(client.chat(ASK, tools=TOOLS).choices[0].message.tool_calls) == 2
        [call] = client.chat(ASK, tools=TOOLS, parallel_tool_calls=False).choices[0].message.tool_calls
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        streamed = [call for chunk in client.stream_chat(ASK, tools=TOOLS, parallel_tool_calls=False)
                    for choice in chunk.choices for call in choice.delta.tool_calls]
        assert [(call.index, call.id) for call in streamed] == [(0, "call0abcd")]
        client.chat(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    # With "required" the grammar itself allows one call only.
    assert json.loads(server.engine.requests[-1].params.structured.schema)["maxItems"] == 1


def _prompt_call_ids(server) -> tuple[list[str], list[str]]:
    """The ids of the tool calls and of the tool results in the last request's prompt."""
    prompt = server.engine.tokenizer.decode(server.engine.requests[-1].prompt_token_ids)
    return re.findall(r'"id": "([^"]*)"', prompt), re.findall(r'"call_id": "([^"]*)"', prompt)


def _call(call_id: str, city: str) -> dict:
    return {"id": call_id, "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}


def test_foreign_tool_call_ids_map_to_nine_alphanumerics_consistently(server, client):
    messages = [{"role": "user", "content": "Weather in Paris and Oslo?"},
                {"role": "assistant", "tool_calls": [_call("call_abc123def456", "Paris"),
                                                     _call("call_abc123def457", "Oslo")]},
                {"role": "tool", "content": "22C", "tool_call_id": "call_abc123def456"},
                {"role": "tool", "content": "3C", "tool_call_id": "call_abc123def457"},
                {"role": "assistant", "content": "Paris 22C, Oslo 3C."},
                {"role": "user", "content": "And Rome?"},
                {"role": "assistant", "tool_calls": [_call("abcDEF123", "Rome")]},
                {"role": "tool", "content": "18C", "tool_call_id": "abcDEF123"}]
    client.chat(messages, tools=TOOLS)
    calls, results = _prompt_call_ids(server)
    assert calls == results  # each result carries the id of the call it answers
    assert all(re.fullmatch(r"[a-zA-Z0-9]{9}", call_id) for call_id in calls)
    assert len(set(calls)) == 3 and calls[2] == "abcDEF123"  # distinct; a valid id stays as it is
    client.chat(messages, tools=TOOLS)
    assert _prompt_call_ids(server) == (calls, results)  # the same conversation makes the same prompt


def test_a_tool_result_for_an_unknown_foreign_id_is_still_refused(server, client):
    with pytest.raises(grpc.RpcError) as caught:
        client.chat([{"role": "user", "content": "Weather?"},
                     {"role": "assistant", "tool_calls": [_call("call_abc123def456", "Paris")]},
                     {"role": "tool", "content": "22C", "tool_call_id": "call_zzz"}], tools=TOOLS)
    assert [name for name, _ in field_violations(caught.value)] == ["messages[2].tool_call_id"]


@pytest.fixture
def long_context_server(serve_fake):
    return serve_fake(max_model_len=32768)


def test_a_chat_response_that_could_outgrow_one_message_is_refused_up_front(long_context_server):
    server = long_context_server
    before = counted("Chat", "INVALID_ARGUMENT")
    with ChatClient(server.target) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.chat(ASK, n=8, max_tokens=20000, logprobs=True, top_logprobs=20)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        violations = field_violations(caught.value)
        assert {name for name, _ in violations} == {"max_tokens", "n", "top_logprobs"}
        assert "StreamChat" in violations[0][1] and "64 MiB" in violations[0][1]
        assert not server.engine.requests
        # Unset max_tokens means what the context leaves, and that is checked too.
        with pytest.raises(grpc.RpcError) as caught:
            client.chat(ASK, n=8, logprobs=True, top_logprobs=20)
        assert "tokens the context leaves" in caught.value.details()
        assert counted("Chat", "INVALID_ARGUMENT") == before + 2
        # The same request streams, and a smaller one is answered whole.
        chunks = list(client.stream_chat(ASK, n=8, max_tokens=20000, logprobs=True, top_logprobs=20))
        assert chunks[-1].usage.completion_tokens == 8 * 9
        assert len(client.chat(ASK, n=8, max_tokens=4000, logprobs=True, top_logprobs=20).choices) == 8


def test_a_response_over_the_limit_is_never_sent_nor_counted_ok(long_context_server, monkeypatch, caplog):
    """Should the check before generating ever let one through, the response is measured before it is sent."""
    server = long_context_server
    monkeypatch.setattr(servicer_module, "MAX_RESPONSE_BYTES", 300)
    ok, invalid = counted("Chat", "OK"), counted("Chat", "INVALID_ARGUMENT")
    with ChatClient(server.target) as client, caplog.at_level(logging.WARNING, logger=servicer_module.__name__):
        with pytest.raises(grpc.RpcError) as caught:
            client.chat(ASK, n=2, logprobs=True)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "StreamChat" in caught.value.details()
    assert (counted("Chat", "OK"), counted("Chat", "INVALID_ARGUMENT")) == (ok, invalid + 1)
    assert any("over the 300" in record.getMessage() for record in caplog.records)
