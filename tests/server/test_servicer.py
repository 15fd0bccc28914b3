"""ChatServicer unit tests through grpcio-testing (no network), on the scripted fake engine."""

import json
import re
import time

import grpc
import grpc_testing
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

import seed_bodies
from fake_engine import FakeEngine, choice_text
from grpc_testing_adapter import SyncServicer
from harness import LoopThread
from mistral_grpc.metrics import REGISTRY
from mistral_grpc.proto.mistral.chat.v1 import chat_pb2
from mistral_grpc.engine.request import EngineUnavailableError, QueueFullError
from mistral_grpc.server.servicer import ChatServicer
from mistral_grpc.tokenizer import ChatMessage, ToolCall

SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"]
CHAT = SERVICE.methods_by_name["Chat"]
STREAM_CHAT = SERVICE.methods_by_name["StreamChat"]
WEATHER_CALL = ToolCall(id="abcDEF123", name="get_weather", arguments='{"city": "Paris"}')
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                 "parameters": {"type": "object", "properties": {
                                                     "city": {"type": "string", "minLength": 1}}}}}


def request(body: dict | str) -> chat_pb2.ChatRequest:
    if isinstance(body, dict):
        body = json.dumps(body)
    return json_format.Parse(body, chat_pb2.ChatRequest())


def hello(**fields) -> chat_pb2.ChatRequest:
    return request({"messages": [{"role": "user", "content": "Hello there!"}], **fields})


def violations(trailing_metadata) -> list[tuple[str, str]]:
    for key, value in trailing_metadata or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            bad_request = error_details_pb2.BadRequest()
            if status.details and status.details[0].Unpack(bad_request):
                return [(v.field, v.description) for v in bad_request.field_violations]
    return []


class Harness:
    def __init__(self, engine: FakeEngine, loop: LoopThread) -> None:
        loop.run(engine.start())
        self.engine = engine
        self.servicer = ChatServicer(engine)
        self.server = grpc_testing.server_from_dictionary({SERVICE: SyncServicer(self.servicer, loop.loop)},
                                                          grpc_testing.strict_real_time())

    def chat(self, message: chat_pb2.ChatRequest):
        response, trailing, code, details = self.server.invoke_unary_unary(CHAT, (), message, None).termination()
        return response, code, details, violations(trailing)

    def stream(self, message: chat_pb2.ChatRequest):
        rpc = self.server.invoke_unary_stream(STREAM_CHAT, (), message, None)
        trailing, code, details = rpc.termination()
        chunks = []
        while True:
            try:
                chunks.append(rpc.take_response())
            except ValueError:  # grpc_testing: no more responses
                break
        return chunks, code, details, violations(trailing)


@pytest.fixture
def make(loop):
    return lambda **engine_kwargs: Harness(FakeEngine(**engine_kwargs), loop)


def test_chat_returns_the_whole_completion_with_exact_usage(make):
    harness = make(model_name=seed_bodies.SERVED_MODEL)
    before = time.time()
    response, code, _, _ = harness.chat(request(seed_bodies.HELLO))
    assert code == grpc.StatusCode.OK
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", response.id)
    assert response.object == "chat.completion"
    assert before - 1 <= response.created <= time.time() + 1
    assert response.model == seed_bodies.SERVED_MODEL
    [choice] = response.choices
    assert (choice.index, choice.message.role, choice.message.content, choice.finish_reason) == (
        0, "assistant", choice_text(0), "stop")
    assert not choice.HasField("logprobs")
    prompt = harness.engine.tokenizer.encode_chat([ChatMessage(role="user", content="Hello!")])
    assert harness.engine.requests[-1].prompt_token_ids == prompt
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (
        len(prompt), 9, len(prompt) + 9)


def test_stream_sends_role_first_then_deltas_then_finish_reason_and_usage(make):
    harness = make(model_name=seed_bodies.SERVED_MODEL)
    chunks, code, _, _ = harness.stream(request(seed_bodies.STREAM))
    assert code == grpc.StatusCode.OK
    assert len({(c.id, c.created, c.model, c.object) for c in chunks}) == 1
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].id.startswith("chatcmpl-")
    assert [c.choices[0].delta.role for c in chunks] == ["assistant"] + [""] * (len(chunks) - 1)
    assert "".join(c.choices[0].delta.content for c in chunks) == choice_text(0)
    assert all(c.choices[0].delta.content for c in chunks)  # the engine's empty delta sends nothing
    assert [c.choices[0].finish_reason for c in chunks] == [""] * (len(chunks) - 1) + ["stop"]
    assert [c.HasField("usage") for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].usage.completion_tokens == 9


def test_n_choices_each_get_an_index_role_and_finish_reason(make):
    harness = make()
    response, code, _, _ = harness.chat(hello(n=3))
    assert code == grpc.StatusCode.OK
    assert [(c.index, c.message.content) for c in response.choices] == [(i, choice_text(i)) for i in range(3)]
    assert response.usage.completion_tokens == 27
    chunks, code, _, _ = harness.stream(hello(n=3))
    assert code == grpc.StatusCode.OK
    for index in range(3):
        mine = [choice for chunk in chunks for choice in chunk.choices if choice.index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(choice.delta.content for choice in mine) == choice_text(index)
        assert mine[-1].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == 27


def test_max_tokens_ends_with_length(make):
    response, code, _, _ = make().chat(hello(max_tokens=2))
    assert code == grpc.StatusCode.OK
    assert (response.choices[0].message.content, response.choices[0].finish_reason) == ("Hello", "length")
    assert response.usage.completion_tokens == 2


def test_sampling_fields_reach_the_engine_and_unset_ones_keep_their_defaults(make):
    harness = make(model_name=seed_bodies.SERVED_MODEL)
    _, code, _, _ = harness.chat(request(seed_bodies.SAMPLING))
    assert code == grpc.StatusCode.OK
    params = harness.engine.requests[-1].params
    assert (params.temperature, params.top_p, params.max_tokens) == (0.2, 0.7, 5)
    assert (params.n, params.top_k, params.seed, params.repetition_penalty) == (1, 0, None, 1.0)
    harness.chat(hello(temperature=0, stop=["\n\n", "END"], seed=7, top_k=40, repetition_penalty=1.1,
                       presence_penalty=0.5, frequency_penalty=-0.5))
    params = harness.engine.requests[-1].params
    assert (params.temperature, params.stop, params.seed, params.top_k) == (0.0, ("\n\n", "END"), 7, 40)
    assert (params.repetition_penalty, params.presence_penalty, params.frequency_penalty) == (1.1, 0.5, -0.5)


def test_logprobs_come_per_token_with_top_alternatives(make):
    harness = make()
    response, code, _, _ = harness.chat(hello(logprobs=True, top_logprobs=2))
    assert code == grpc.StatusCode.OK
    entries = response.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == choice_text(0) and len(entries) == 9
    assert all(len(e.top_logprobs) == 2 and e.logprob == -0.25 for e in entries)
    assert bytes(entries[0].bytes) == b"Hel"
    chunks, _, _, _ = harness.stream(hello(logprobs=True))
    streamed = [e.token for c in chunks for e in c.choices[0].logprobs.content]
    assert streamed == [e.token for e in entries]


def test_tool_calls_come_whole_with_finish_reason_tool_calls(make):
    harness = make(tool_calls=(WEATHER_CALL,))
    response, code, _, _ = harness.chat(hello(tools=[WEATHER_TOOL]))
    assert code == grpc.StatusCode.OK
    [choice] = response.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content == ""
    [call] = choice.message.tool_calls
    assert (call.id, call.type, call.function.name) == ("abcDEF123", "function", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Paris"} and not call.HasField("index")

    chunks, code, _, _ = harness.stream(hello(tools=[WEATHER_TOOL], n=2))
    assert code == grpc.StatusCode.OK
    for index in range(2):
        mine = [choice for chunk in chunks for choice in chunk.choices if choice.index == index]
        assert mine[0].delta.role == "assistant" and not mine[0].delta.tool_calls
        assert mine[-1].finish_reason == "tool_calls"
        [call] = mine[-1].delta.tool_calls
        assert (call.index, call.id, call.function.name) == (0, "abcDEF123", "get_weather")


def test_tools_reach_the_template_with_their_schema_as_sent(make, monkeypatch):
    harness = make()
    seen = []
    encode = harness.engine.tokenizer.encode_chat
    monkeypatch.setattr(harness.engine.tokenizer, "encode_chat", lambda m, t: seen.append(t) or encode(m, t))
    harness.chat(hello(tools=[WEATHER_TOOL]))
    [tool] = seen[-1]
    assert (tool.name, tool.description) == ("get_weather", "Weather in a city")
    assert tool.parameters["properties"]["city"] == {"type": "string", "minLength": 1}
    assert isinstance(tool.parameters["properties"]["city"]["minLength"], int)
    harness.chat(hello(tools=[WEATHER_TOOL], tool_choice="none"))
    assert seen[-1] is None


def test_assistant_tool_calls_and_tool_results_reach_the_template(make, monkeypatch):
    harness = make()
    seen = []
    encode = harness.engine.tokenizer.encode_chat
    monkeypatch.setattr(harness.engine.tokenizer, "encode_chat", lambda m, t: seen.append(m) or encode(m, t))
    _, code, _, _ = harness.chat(request({"tools": [WEATHER_TOOL], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "abcDEF123", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "content": "22C", "tool_call_id": "abcDEF123", "name": "get_weather"}]}))
    assert code == grpc.StatusCode.OK
    user, assistant, tool = seen[-1]
    assert (assistant.tool_calls[0].id, assistant.tool_calls[0].name) == ("abcDEF123", "get_weather")
    assert json.loads(assistant.tool_calls[0].arguments) == {"city": "Paris"}
    assert (tool.role, tool.content, tool.tool_call_id, tool.name) == ("tool", "22C", "abcDEF123", "get_weather")
    assert (user.name, user.tool_calls, user.tool_call_id) == (None, [], None)


BAD_FIELDS = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [{"function": {"name": "f"}}]}]},
     "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "not json"}}]}, {"role": "user", "content": "b"}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
        {"id": "abcDEF123", "type": "function", "function": {"arguments": "{}"}}]},
        {"role": "tool", "content": "b", "tool_call_id": "abcDEF123"}]},
     "messages[1].tool_calls[0].function.name"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "NaN"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 9}, "n"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": 11}, "repetition_penalty"),
    ({"seed": -1}, "seed"),
    ({"stop": ["s"] * 17}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "any"}, "tool_choice"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces!"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools[1].function.name"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "answer"}}},
     "response_format.json_schema.schema"),
    # OpenAI's rules too:
    ({"response_format": {"type": "json_object", "json_schema": {"name": "a", "schema": {"type": "object"}}}},
     "response_format.json_schema"),
    ({"response_format": {"type": "text", "json_schema": {"name": "a"}}}, "response_format.json_schema"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": "none"}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {"type": "object"}}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n" * 65, "schema": {"type": "object"}}}},
     "response_format.json_schema.name"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
        {"id": "abcDEF123", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "b", "tool_call_id": "XYZ987654"}]},
     "messages[2].tool_call_id"),
]


@pytest.mark.parametrize("fields,field", BAD_FIELDS, ids=[f for _, f in BAD_FIELDS])
@pytest.mark.parametrize("rpc", ["chat", "stream"])
def test_each_bad_field_is_invalid_argument_naming_it(make, fields, field, rpc):
    harness = make()
    _, code, details, bad = getattr(harness, rpc)(hello(**fields))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert {name for name, _ in bad} == {field}
    assert field in details
    assert not harness.engine.requests


@pytest.mark.parametrize("fields", [{"tools": [WEATHER_TOOL]}, {"tools": [WEATHER_TOOL], "tool_choice": "auto"},
                                    {"tools": [WEATHER_TOOL], "tool_choice": "none"}])
def test_tools_on_a_model_without_tool_calls_are_invalid_argument(make, fields):
    harness = make(template="v1")  # Mistral-7B-Instruct v0.1/v0.2: no tool calls in the chat format
    _, code, _, bad = harness.chat(hello(**fields))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = bad
    assert field == "tools" and "v0.1/v0.2" in description and "no tool calls" in description
    assert not harness.engine.requests
    assert harness.chat(hello())[1] == grpc.StatusCode.OK


def test_a_tool_result_answering_an_earlier_call_is_fine(make):
    call = {"id": "abcDEF123", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    _, code, _, bad = make().chat(request({"tools": [WEATHER_TOOL], "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "content": "b", "tool_call_id": "abcDEF123"}]}))
    assert (code, bad) == (grpc.StatusCode.OK, [])


@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "frequency_penalty",
                                   "repetition_penalty"])
def test_nan_is_one_violation_saying_it_is_not_a_number(make, field):
    _, code, _, bad = make().chat(hello(**{field: "NaN"}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert bad == [(field, "must be a number (got NaN)")]


def test_a_long_stop_list_is_counted_not_repeated(make):
    _, code, details, bad = make().chat(hello(stop=[f"stop string number {i} " * 50 for i in range(17)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert bad == [("stop", "allows at most 16 strings (got 17)")]
    assert len(details) < 200
    _, _, _, bad = make().chat(hello(stop=["a", "", "b"]))
    assert bad == [("stop", "must not contain empty strings (stop[1] is empty)")]


def test_a_prompt_that_fills_the_context_says_no_room_is_left(make):
    harness = make(max_model_len=64)
    words = " ".join(["word"] * 61)
    prompt = len(harness.engine.tokenizer.encode_chat([ChatMessage(role="user", content=words)]))
    assert prompt == 64  # exactly the context: nothing left for the answer
    for fields in ({}, {"max_tokens": 1}):
        _, code, _, bad = harness.chat(request({"messages": [{"role": "user", "content": words}], **fields}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        [(field, description)] = bad
        assert field == "messages" and "no room is left for the answer" in description
        assert f"{prompt} tokens" in description and "64" in description


def test_a_conversation_too_long_by_its_characters_alone_is_refused_before_encoding(make, monkeypatch):
    """No token spans more than max_token_chars characters, so more characters than the context times
    that cannot fit: refused without the seconds of CPU encoding would take (a 15 MiB request: ~5 s)."""
    harness = make(max_model_len=64)
    tokenizer = harness.engine.tokenizer
    limit = 64 * tokenizer.max_token_chars

    def no_encoding(*args):
        raise AssertionError("the conversation was encoded")

    monkeypatch.setattr(tokenizer, "encode_chat", no_encoding)
    _, code, _, bad = harness.chat(request({"messages": [{"role": "system", "content": "a" * (limit // 2)},
                                                         {"role": "user", "content": "b" * (limit // 2 + 1)}]}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert bad == [("messages", f"the messages hold {limit + 1} characters, more than a context of 64 tokens can "
                                "take; shorten the conversation")]


def test_a_full_queue_says_retry_once(make, monkeypatch):
    harness = make()

    def refuse(request):
        raise QueueFullError("the queue is full (4 requests in flight); retry later")  # the engine's words

    monkeypatch.setattr(harness.engine, "generate", refuse)
    _, code, details, _ = harness.chat(hello())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details == "the server is at capacity: the queue is full (4 requests in flight); retry with backoff"


def test_all_bad_fields_are_reported_at_once(make):
    _, code, details, bad = make().chat(request({"messages": [{"role": "robot"}], "temperature": 3, "n": 0}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert [name for name, _ in bad] == ["messages[0].role", "temperature", "n"]


def test_template_errors_name_the_offending_field(make):
    _, code, _, bad = make().chat(request({"messages": [{"role": "user", "content": "a"},
                                                        {"role": "assistant", "content": "b"}]}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert bad == [("messages[1].role",
                    "the conversation must end with a user or tool message for the assistant to answer")]


def test_prompt_plus_max_tokens_beyond_the_context_names_both_numbers(make):
    harness = make(max_model_len=64)
    words = " ".join(["word"] * 40)
    prompt = len(harness.engine.tokenizer.encode_chat([ChatMessage(role="user", content=words)]))
    _, code, details, bad = harness.chat(request({"messages": [{"role": "user", "content": words}],
                                                  "max_tokens": 30}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = bad
    assert field == "max_tokens" and prompt + 30 > 64
    assert f"{prompt} tokens" in description and "max_tokens (30)" in description and "64" in description
    _, code, _, _ = harness.chat(request({"messages": [{"role": "user", "content": words}],
                                          "max_tokens": 64 - prompt}))
    assert code == grpc.StatusCode.OK
    _, code, _, bad = harness.chat(request({"messages": [{"role": "user", "content": words * 2}]}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and bad[0][0] == "messages"


def test_unknown_model_is_not_found_and_the_served_or_empty_name_is_fine(make):
    harness = make(model_name=seed_bodies.SERVED_MODEL)
    _, code, details, _ = harness.chat(request(seed_bodies.CONVERSATION))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "meta-llama/Meta-Llama-3-70B-Instruct" in details and seed_bodies.SERVED_MODEL in details
    for model in ("", seed_bodies.SERVED_MODEL):
        body = json.loads(seed_bodies.CONVERSATION) | {"model": model}
        _, code, _, _ = harness.chat(request(body))
        assert code == grpc.StatusCode.OK


def test_loading_draining_and_full_queue(make, loop):
    harness = make()
    harness.engine.ready = False
    assert harness.chat(hello())[1] == grpc.StatusCode.UNAVAILABLE
    harness.engine.ready = True
    harness.servicer.start_draining()
    _, code, details, _ = harness.stream(hello())
    assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details
    _, code, details, _ = make(max_queue=0).chat(hello())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("error,code", [
    (QueueFullError("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineUnavailableError("draining"), grpc.StatusCode.UNAVAILABLE),
])
def test_engine_errors_map_to_their_codes(make, monkeypatch, error, code):
    harness = make()

    def refuse(request):
        raise error

    monkeypatch.setattr(harness.engine, "generate", refuse)
    assert harness.chat(hello())[1] == code
    assert harness.stream(hello())[1] == code


@pytest.mark.parametrize("fail_after_steps", [0, 3])
def test_engine_failures_are_internal_without_leaking_details(make, fail_after_steps, caplog):
    harness = make(fail_after_steps=fail_after_steps)
    for rpc in ("chat", "stream"):
        _, code, details, _ = getattr(harness, rpc)(hello())
        assert code == grpc.StatusCode.INTERNAL
        assert "secret" not in details and "Traceback" not in details and "incident" in details
    assert "secret internals" in caplog.text  # the server log has it all
    assert harness.engine.kv_blocks_used() == 0


def test_a_cancelled_stream_frees_its_kv_blocks(make):
    harness = make(step_delay=0.05, pieces=tuple(f" w{i}" for i in range(200)))
    rpc = harness.server.invoke_unary_stream(STREAM_CHAT, (), hello(), None)
    rpc.take_response()
    rpc.take_response()
    assert harness.engine.kv_blocks_used() > 0
    rpc.cancel()
    _wait_for(lambda: harness.engine.kv_blocks_used() == 0)


def test_requests_are_counted_by_rpc_and_code(make):
    def count(rpc: str, code: str) -> float:
        return REGISTRY.get_sample_value("mistral_grpc_requests_total", {"rpc": rpc, "code": code}) or 0.0

    harness = make()
    before = count("Chat", "OK"), count("StreamChat", "INVALID_ARGUMENT"), count("Chat", "NOT_FOUND")
    harness.chat(hello())
    harness.stream(hello(n=0))
    harness.chat(hello(model="nope"))
    after = count("Chat", "OK"), count("StreamChat", "INVALID_ARGUMENT"), count("Chat", "NOT_FOUND")
    assert [a - b for a, b in zip(after, before)] == [1, 1, 1]


class _DeadlineContext:
    """An aio ServicerContext whose remaining time the test sets."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code, details="", trailing_metadata=()) -> None:
        raise AssertionError(f"unexpected abort: {code} {details}")


@pytest.mark.parametrize("budget,left,code", [
    (15.0, 0.1, "DEADLINE_EXCEEDED"),  # the client's deadline fired first: its cancel came 100 ms early
    (40.0, 0.3, "DEADLINE_EXCEEDED"),
    (15.0, 0.0, "DEADLINE_EXCEEDED"),
    (15.0, 10.0, "CANCELLED"),  # the client gave up long before its deadline
    (None, None, "CANCELLED"),  # no deadline at all
])
def test_a_cancel_at_the_deadline_counts_as_deadline_exceeded(loop, budget, left, code):
    def count(name: str) -> float:
        return REGISTRY.get_sample_value("mistral_grpc_requests_total", {"rpc": "Chat", "code": name}) or 0.0

    engine = FakeEngine(step_delay=0.02, pieces=tuple(f" w{i}" for i in range(500)))
    loop.run(engine.start())
    servicer = ChatServicer(engine)
    context = _DeadlineContext(budget)
    before = count(code)
    call = loop.submit(servicer.Chat(hello(), context))
    _wait_for(lambda: engine.kv_blocks_used() > 0)
    context.remaining = left
    call.cancel()  # grpc.aio cancels the handler's task when the client's cancel arrives
    _wait_for(lambda: count(code) == before + 1)
    _wait_for(lambda: engine.kv_blocks_used() == 0)


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)
