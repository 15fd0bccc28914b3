"""v0.3 tool-call output parsing: OpenAI-shaped calls, or the text back as content when malformed."""

from __future__ import annotations

import json
import re

import pytest

from mistral_grpc.tokenizer import ChatMessage, ToolCall, ToolDefinition

ID = re.compile(r"^[a-zA-Z0-9]{9}$")


def test_calls_are_parsed(ours) -> None:
    text = ' [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, ' \
           '{"name": "get_time", "arguments": {}}]'
    content, calls = ours["v3"].parse_tool_calls(text)
    assert content == ""
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris", "unit": "celsius"}
    assert calls[1].arguments == "{}"
    assert all(ID.match(c.id) for c in calls) and calls[0].id != calls[1].id


@pytest.mark.parametrize(
    ("text", "arguments"),
    [
        ('{"name": "f", "arguments": {"x": 1}}', {"x": 1}),  # one bare object
        ('[{"name": "f", "arguments": "{\\"x\\": \\"東京\\"}"}]', {"x": "東京"}),  # arguments as JSON text
        ('[{"name": "f"}]', {}),
    ],
)
def test_accepted_variants(ours, text, arguments) -> None:
    content, calls = ours["v3"].parse_tool_calls(text)
    assert content == "" and len(calls) == 1
    assert json.loads(calls[0].arguments) == arguments


@pytest.mark.parametrize(
    "text",
    [
        "The weather in Paris is sunny.",
        '[{"name": "get_weather", "arguments": {"city": "Par',  # cut off by max_tokens
        '[{"name": "get_weather", "arguments": {}}] and some chatter',
        "[]",
        '[{"arguments": {}}]',
        '[{"name": "bad name", "arguments": {}}]',
        '[{"name": "f", "arguments": [1, 2]}]',
        '[{"name": "f", "arguments": "not json"}]',
        '["f"]',
        "[" * 100000,
        "",
    ],
)
def test_malformed_output_falls_back_to_content(ours, text) -> None:
    assert ours["v3"].parse_tool_calls(text) == (text, [])


def test_v1_never_has_tool_calls(ours) -> None:
    text = '[{"name": "f", "arguments": {}}]'
    assert ours["v1"].parse_tool_calls(text) == (text, [])


def test_template_payload_parses_back(ours) -> None:
    """What the template writes for a call in history is what the parser reads from the model."""
    tokenizer = ours["v3"]
    call = ToolCall("a1B2c3D4e", "get_weather", '{"city": "São Paulo", "days": [1, 2]}')
    messages = [ChatMessage("user", "Weather?"), ChatMessage("assistant", tool_calls=[call]),
                ChatMessage("tool", "{}", tool_call_id=call.id)]
    ids = tokenizer.encode_chat(messages, [ToolDefinition("get_weather", "", {})])
    start = ids.index(tokenizer.tool_calls_token_id) + 1
    payload = ids[start : ids.index(tokenizer.eos_id, start)]
    content, calls = tokenizer.parse_tool_calls(tokenizer.decode(payload))
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [(call.name, json.loads(call.arguments))]
