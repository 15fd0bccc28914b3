"""Tokenizer test material: file paths, random texts and conversations, conversion to mistral-common."""

from __future__ import annotations

import random
import string
from pathlib import Path

import mistral_common
from mistral_common.protocol.instruct import messages as mc
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool
from mistral_common.protocol.instruct.tool_calls import ToolCall as McToolCall

import mistral_grpc
from mistral_grpc.tokenizer import ChatMessage, ToolCall, ToolDefinition

SHIPPED = {v: Path(mistral_grpc.__file__).parent / "data" / f"mistral_tokenizer_{v}.json" for v in ("v1", "v3")}
REFERENCE_MODELS = {
    v: Path(mistral_common.__file__).parent / "data" / name
    for v, name in (("v1", "tokenizer.model.v1"), ("v3", "mistral_instruct_tokenizer_240323.model.v3"))
}

CONTROL_SPELLINGS = [
    "<s>", "</s>", "<unk>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[IMG]", "[PREFIX]", "[SUFFIX]", "[MIDDLE]", "[control_12]",
]
FRAGMENTS = CONTROL_SPELLINGS + [
    "Hello!", "What's the weather in Paris?", " ", "  ", "     ", " " * 17, " " * 33, "\n", "\n\n", "\t", "\r\n",
    "\u00a0", "\u3000", "\u200b", "\ufeff", "\x00", "\x7f", "\u2581", "\u2581\u2581x", "<0x41>", "[REFERENCE_DOC_3]",
    "日本語のテキスト", "中文测试", "한국어", "Ελληνικά", "עברית", "café naïve", "x\u0301", "Ω", "ﬁ", "①", "ｆｕｌｌ",
    "😀", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "\U0010ffff", '{"json": [1, 2.5, {"a": null}]}', "```py\nprint(1)\n```",
    "1234567890", "3.14159", "don't", "I'm", "[", "]", "INST", "a" * 40,
]


def random_text(rng: random.Random, max_parts: int = 10) -> str:
    parts = []
    for _ in range(rng.randint(0, max_parts)):
        roll = rng.random()
        if roll < 0.6:
            parts.append(rng.choice(FRAGMENTS))
        elif roll < 0.8:
            parts.append(" " * rng.randint(0, 3) + "".join(rng.choices(string.ascii_letters, k=rng.randint(1, 12))))
        else:
            parts.append(chr(rng.choice([rng.randint(32, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])))
    return "".join(parts)


GOOD_NAMES = ["get_weather", "search-web", "f1", "A" * 64]
BAD_NAMES = ["bad name", "x" * 65, "naïve", "a.b"]
ARGUMENTS = ['{"city": "Paris"}', "", "{}", '{"nested": {"a": [1, 2.5, "é", null]}}', "not json", "[1, 2]",
             '"a string"', '{"emoji": "😀", "text": "[INST] </s>"}', "  {\"spaced\": true}  ", "NaN"]
TOOL_CONTENTS = ['{"temp": 21}', "sunny", "", "[1, 2]", '{"unicode": "東京"}', "null", " 42 ", "[TOOL_RESULTS] x"]
PARAMETERS = [
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    {},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}, "tags": {"type": "array"}}},
]
BAD_PARAMETERS = [{"type": 5}, {"required": "city"}]


def call_id(rng: random.Random, sloppy: bool) -> str:
    if sloppy and rng.random() < 0.3:
        return rng.choice(["null", "", "short", "tooLong1234", "has_under", "ab-cd-efg"])
    return "".join(rng.choices(string.ascii_letters + string.digits, k=9))


def tool_definitions(rng: random.Random, sloppy: bool) -> list[ToolDefinition] | None:
    if rng.random() < 0.5:
        return None
    tools = []
    for _ in range(rng.randint(0, 3)):
        bad = sloppy and rng.random() < 0.15
        name = rng.choice(BAD_NAMES if bad and rng.random() < 0.5 else GOOD_NAMES)
        parameters = rng.choice(BAD_PARAMETERS if bad else PARAMETERS)
        tools.append(ToolDefinition(name, random_text(rng, 3), parameters))
    return tools


def assistant_with_calls(rng: random.Random, sloppy: bool, count: int) -> ChatMessage:
    calls = [
        ToolCall(call_id(rng, sloppy), rng.choice(BAD_NAMES if sloppy and rng.random() < 0.1 else GOOD_NAMES),
                 rng.choice(ARGUMENTS))
        for _ in range(count)
    ]
    content = random_text(rng, 2) if sloppy and rng.random() < 0.1 else ""
    return ChatMessage("assistant", content, tool_calls=calls)


def well_formed(rng: random.Random, with_tools: bool, sloppy: bool = False) -> list[ChatMessage]:
    """system?, (user+ [assistant-calls tool*]* assistant)*, user — with occasional odd placements."""
    messages = []
    if rng.random() < 0.4:
        messages.append(ChatMessage("system", random_text(rng)))
    turns = rng.choice([1, 1, 2, 3, 5, 20])
    for turn in range(turns):
        messages.append(ChatMessage("user", random_text(rng)))
        if rng.random() < 0.1:
            messages.append(ChatMessage("user", random_text(rng)))
        if rng.random() < 0.05:
            messages.append(ChatMessage("system", random_text(rng)))
        if with_tools and rng.random() < 0.4:
            caller = assistant_with_calls(rng, sloppy, rng.randint(1, 3))
            messages.append(caller)
            for call in caller.tool_calls:
                name = rng.choice([None, call.name, "bad name"]) if sloppy else None
                messages.append(ChatMessage("tool", rng.choice(TOOL_CONTENTS), name=name, tool_call_id=call.id))
            if turn == turns - 1 and rng.random() < 0.5:
                return messages  # ends on tool results: the model answers them
        if turn < turns - 1:
            content = random_text(rng) or "ok"
            messages.append(ChatMessage("assistant", content))
    return messages


def chaotic(rng: random.Random, with_tools: bool) -> list[ChatMessage]:
    """Any roles in any order: mostly conversations Mistral's format refuses."""
    roles = ["system", "user", "assistant", "tool"] if with_tools else ["system", "user", "assistant"]
    messages = []
    for _ in range(rng.randint(0, 6)):
        role = rng.choice(roles)
        if role == "assistant" and with_tools and rng.random() < 0.4:
            messages.append(assistant_with_calls(rng, True, rng.randint(1, 2)))
        elif role == "assistant":
            messages.append(ChatMessage("assistant", rng.choice(["", random_text(rng)])))
        elif role == "tool":
            messages.append(ChatMessage("tool", rng.choice(TOOL_CONTENTS), tool_call_id=call_id(rng, True)))
        else:
            messages.append(ChatMessage(role, random_text(rng)))
    return messages


def reference_request(messages: list[ChatMessage], tools: list[ToolDefinition] | None) -> ChatCompletionRequest:
    converted = []
    for m in messages:
        if m.role == "system":
            converted.append(mc.SystemMessage(content=m.content))
        elif m.role == "user":
            converted.append(mc.UserMessage(content=m.content))
        elif m.role == "assistant":
            calls = [McToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                     for c in m.tool_calls]
            converted.append(mc.AssistantMessage(content=m.content or None, tool_calls=calls or None))
        else:
            converted.append(mc.ToolMessage(content=m.content, tool_call_id=m.tool_call_id, name=m.name))
    functions = [Tool(function=Function(name=t.name, description=t.description, parameters=t.parameters))
                 for t in tools or []]
    return ChatCompletionRequest(model="mistral-7b-instruct", messages=converted, tools=functions or None)
