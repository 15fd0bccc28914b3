"""Mistral-7B-Instruct chat formats: a conversation -> text and control-token segments.

Mirrors mistral-common's InstructRequestNormalizer (merging turns) and InstructTokenizerV1 / V3
(placing them): v1 (v0.1/v0.2) writes "[INST] ... [/INST]" as plain text, v3 (v0.3) uses control
tokens. Only this module emits control tokens; message text always becomes text segments.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

from mistral_grpc.tokenizer.messages import ChatMessage, TemplateError, ToolCall, ToolDefinition
from mistral_grpc.tokenizer.validation import check_conversation

Segment = str | int  # text to encode, or a control token id
JOIN = "\n\n"  # between merged messages, and after the system prompt


V3_CONTROLS = {
    "inst": "[INST]",
    "end_inst": "[/INST]",
    "available_tools": "[AVAILABLE_TOOLS]",
    "end_available_tools": "[/AVAILABLE_TOOLS]",
    "tool_results": "[TOOL_RESULTS]",
    "end_tool_results": "[/TOOL_RESULTS]",
    "tool_calls": "[TOOL_CALLS]",
}


@dataclass(frozen=True)
class ControlTokens:
    """Token ids the template emits; the V3_CONTROLS ones exist in v3 vocabularies only."""

    bos: int
    eos: int
    inst: int | None = None
    end_inst: int | None = None
    available_tools: int | None = None
    end_available_tools: int | None = None
    tool_results: int | None = None
    end_tool_results: int | None = None
    tool_calls: int | None = None


def render(
    version: str, messages: list[ChatMessage], tools: list[ToolDefinition] | None, controls: ControlTokens
) -> list[Segment]:
    """The prompt as segments, BOS first; raises TemplateError where mistral-common refuses."""
    check_conversation(messages, tools, version)
    system_prompt, turns = _merge(messages)
    if version == "v1":
        return _render_v1(system_prompt, turns, controls)
    return _render_v3(system_prompt, turns, tools or [], controls)


def _merge(messages: list[ChatMessage]) -> tuple[str | None, list[tuple[int, ChatMessage]]]:
    """System prompts joined into one; runs of user or assistant messages merged into one turn.

    Each turn keeps the index of its first message, for error fields. System messages still split
    runs (user, system, user stays two user turns), as in mistral-common.
    """
    system_prompt = JOIN.join(m.content for m in messages if m.role == "system" and m.content) or None
    turns: list[tuple[int, ChatMessage]] = []
    for role, group in itertools.groupby(enumerate(messages), key=lambda item: item[1].role):
        run = list(group)
        if role == "tool":
            turns.extend(run)
        elif role in ("user", "assistant"):
            content = JOIN.join(m.content for _, m in run if m.content)
            calls = [call for _, m in run for call in m.tool_calls]
            turns.append((run[0][0], ChatMessage(role, content, tool_calls=calls)))
    if not turns or turns[0][1].role != "user":
        turns.insert(0, (0, ChatMessage("user", "")))
    return system_prompt, turns


def _render_v1(system_prompt: str | None, turns: list[tuple[int, ChatMessage]], tok: ControlTokens) -> list[Segment]:
    first_user = next(i for i, (_, m) in enumerate(turns) if m.role == "user")
    segments: list[Segment] = [tok.bos]
    for i, (source, message) in enumerate(turns):
        if message.role == "user":
            content = message.content
            if i == first_user and system_prompt:
                content = system_prompt + JOIN + content
            segments.append(f"[INST] {content} [/INST]")
        elif message.role == "tool":
            raise TemplateError(_NO_TOOLS_IN_V1, f"messages[{source}].role")
        elif message.tool_calls:
            raise TemplateError(_NO_TOOLS_IN_V1, f"messages[{source}].tool_calls")
        else:
            segments += [message.content, tok.eos]
    return segments


_NO_TOOLS_IN_V1 = "this model's chat format (v1: Mistral-7B-Instruct v0.1/v0.2) has no tool calls or tool results"


def _render_v3(
    system_prompt: str | None, turns: list[tuple[int, ChatMessage]], tools: list[ToolDefinition], tok: ControlTokens
) -> list[Segment]:
    # Tool definitions and the system prompt go with the last user turn.
    last_user = max(i for i, (_, m) in enumerate(turns) if m.role == "user")
    segments: list[Segment] = [tok.bos]
    for i, (source, message) in enumerate(turns):
        if message.role == "user":
            content = message.content
            if i == last_user:
                if tools:
                    segments += [tok.available_tools, _json([_tool_json(t) for t in tools]), tok.end_available_tools]
                if system_prompt:
                    content = system_prompt + JOIN + content
            segments += [tok.inst, content, tok.end_inst]
        elif message.role == "tool":
            result = {"content": _json_value(message.content), "call_id": message.tool_call_id}
            segments += [tok.tool_results, _json(result), tok.end_tool_results]
        elif message.tool_calls:
            if message.content:
                raise TemplateError(
                    "consecutive assistant messages merge into one turn, which cannot hold both content and tool_calls",
                    f"messages[{source}]",
                )
            segments += [tok.tool_calls, _json([_call_json(c) for c in message.tool_calls]), tok.eos]
        else:
            segments += [message.content.rstrip(" "), tok.eos]
    return segments


def _tool_json(tool: ToolDefinition) -> dict[str, Any]:
    function = {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
    return {"type": "function", "function": function}


def _call_json(call: ToolCall) -> dict[str, Any]:
    encoded = {"name": call.name, "arguments": _json_value(call.arguments)}
    if call.id and call.id != "null":
        encoded["id"] = call.id
    return encoded


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _json_value(text: str) -> Any:
    """JSON text as its value (embedded as JSON, not as a string); other text stays a string."""
    if not text:
        return {}
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nesting too deep for Python's parser
        return text
