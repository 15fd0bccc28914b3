"""Structured output through gRPC: response_format json_object / json_schema on the demo engine in Chat
and StreamChat (n > 1, seeds, the "length" ending), bad schemas as INVALID_ARGUMENT naming the field,
and tool_choice "any" (a tool-call grammar on v0.3, refused on v0.1/v0.2)."""

import json
from collections import defaultdict

import grpc
import jsonschema
import pytest

from harness import demo_server
from mistral_grpc.client import ChatClient, field_violations

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def demo(loop):
    with demo_server(loop, kv_cache_memory=8 * 2**20, max_batch_size=8) as server:
        yield server


@pytest.fixture
def client(demo):
    with ChatClient(demo.target, timeout=120) as client:
        yield client


def streamed(chunks) -> tuple[dict[int, str], dict[int, str]]:
    """Each choice's text and finish_reason from a StreamChat."""
    texts: dict[int, str] = defaultdict(str)
    finish: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return texts, finish


def test_chat_and_stream_chat_answers_follow_the_schema(client):
    fields = dict(response_format=JSON_SCHEMA, n=3, seed=5, max_tokens=160)
    response = client.chat("Who are you?", **fields)
    texts, finish = streamed(client.stream_chat("Who are you?", **fields))
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        assert (texts[choice.index], finish[choice.index]) == (choice.message.content, "stop")
    assert len({c.message.content for c in response.choices}) == 3  # each choice its own draw


def test_json_object_cut_by_max_tokens_ends_with_length(client):
    response = client.chat("Tell me everything.", response_format={"type": "json_object"}, seed=1, max_tokens=6,
                           temperature=1.2)
    [choice] = response.choices
    assert choice.finish_reason == "length" and response.usage.completion_tokens == 6
    assert choice.message.content.startswith("{")
    texts, finish = streamed(client.stream_chat("Tell me everything.", response_format={"type": "json_object"},
                                                seed=1, max_tokens=6, temperature=1.2))
    assert (texts[0], finish[0]) == (choice.message.content, "length")


@pytest.mark.parametrize("schema, problem", [
    ({"type": "objekt"}, "not a valid JSON Schema"),  # jsonschema's metaschema refuses it
    ({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}, "nowhere"),  # xgrammar cannot resolve it
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}}}, "minimum"),
    # valid JSON Schema that xgrammar would compile but not enforce: refused, naming the keyword and where
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems at / is not supported"),
    ({"type": "object", "properties": {"a": {"type": "array", "contains": {"const": 5}}}},
     "contains at /properties/a is not supported"),
    ({"not": {}}, "not at / is not supported"),
    ({"type": "object", "properties": {"a": {"type": "boolean"}}, "if": {"properties": {"a": {"const": True}}},
      "then": {"required": ["a"]}}, "if at / is not supported"),
])
@pytest.mark.parametrize("rpc", ["chat", "stream_chat"])
def test_a_bad_schema_is_invalid_argument_naming_the_field(client, schema, problem, rpc):
    body = {"type": "json_schema", "json_schema": {"name": "bad", "schema": schema}}
    with pytest.raises(grpc.RpcError) as caught:
        if rpc == "chat":
            client.chat("hi", response_format=body, max_tokens=4)
        else:
            list(client.stream_chat("hi", response_format=body, max_tokens=4))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = field_violations(caught.value)
    assert field == "response_format.json_schema.schema" and problem in description


def test_tool_choice_any_needs_a_model_with_tool_calls(client):
    with pytest.raises(grpc.RpcError) as caught:
        client.chat("Weather in Paris?", tools=[WEATHER_TOOL], tool_choice="any", max_tokens=4)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in field_violations(caught.value)] == ["tool_choice"]


# ---- what reaches the engine (the scripted engine, v0.3 tokenizer) ---------------------------


def test_tool_choice_any_constrains_the_answer_to_calls_of_the_given_tools(serve_fake):
    server = serve_fake()
    with ChatClient(server.target, timeout=30) as client:
        client.chat("Weather in Paris?", tools=[WEATHER_TOOL], tool_choice="any")
        client.chat("Weather in Paris?", tools=[WEATHER_TOOL])
    forced, auto = server.engine.requests
    assert forced.params.structured.kind == "tool_calls" and auto.params.structured is None
    calls = json.loads(forced.params.structured.schema)
    [call] = calls["items"]["anyOf"]
    assert list(call["properties"]) == ["name", "arguments"]  # Mistral's order
    assert call["properties"]["name"] == {"const": "get_weather"}
    assert call["properties"]["arguments"]["properties"]["city"] == {"maxLength": 12, "type": "string"}


def test_the_schema_reaches_the_engine_canonical_with_its_integers(serve_fake):
    server = serve_fake()
    with ChatClient(server.target, timeout=30) as client:
        client.chat("hi", response_format=JSON_SCHEMA)
        client.chat("hi", response_format={"type": "json_object"})
        client.chat("hi", response_format={"type": "text"})
    schema, json_object, text = (r.params.structured for r in server.engine.requests)
    assert schema.kind == "json_schema" and json.loads(schema.schema) == SCHEMA
    assert '"maxLength":6' in schema.schema  # google.protobuf.Struct's 6.0 back to 6
    assert schema.schema == json.dumps(SCHEMA, sort_keys=True, separators=(",", ":"))
    assert (json_object.kind, json.loads(json_object.schema)) == ("json_object", {"type": "object"})
    assert text is None


@pytest.mark.parametrize("fields, field", [
    ({"tools": [WEATHER_TOOL], "tool_choice": "any", "response_format": {"type": "json_object"}},
     "response_format.type"),
    ({"tools": [{"type": "function", "function": {"name": "echo", "parameters": {"type": "string"}}}],
      "tool_choice": "any"}, "tools[0].function.parameters"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
])
def test_conflicting_or_missing_constraints_are_invalid_argument(serve_fake, fields, field):
    server = serve_fake()
    with ChatClient(server.target, timeout=30) as client, pytest.raises(grpc.RpcError) as caught:
        client.chat("hi", **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [name for name, _ in field_violations(caught.value)] == [field]
    assert not server.engine.requests
