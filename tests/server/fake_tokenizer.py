"""A stand-in for mistral_grpc.tokenizer (the names the server uses), until the real one lands.

Counts a word as a token and wraps each message in control tokens, so tests can predict usage.
"""

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


@dataclass(frozen=True)
class ToolDefinition:
    name: str
    description: str
    parameters: dict


class TemplateError(ValueError):
    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


TOOL_CALLS_MARK = "[TOOL_CALLS]"


class MistralTokenizer:
    template_version = "v3"
    eos_id = 2

    def encode_chat(self, messages: list[ChatMessage], tools: list[ToolDefinition] | None) -> list[int]:
        last = len(messages) - 1
        if messages[last].role not in ("user", "tool"):
            raise TemplateError("the conversation must end with a user or tool message", f"messages[{last}].role")
        ids = [1]
        if tools:
            ids += [5] * len(json.dumps([t.parameters for t in tools]).split())
        for message in messages:
            ids += [3] + [1000 + len(word) for word in message.content.split()] + [4]
        return ids

    def parse_tool_calls(self, text: str) -> tuple[str, list[ToolCall]]:
        if not text.startswith(TOOL_CALLS_MARK):
            return text, []
        try:
            calls = json.loads(text[len(TOOL_CALLS_MARK):])
        except json.JSONDecodeError:
            return text, []
        return "", [ToolCall(id=call.get("id", ""), name=call["name"], arguments=json.dumps(call["arguments"]))
                    for call in calls]
