"""The conversation types the template reads and the error it raises."""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


@dataclass
class ToolDefinition:
    name: str
    description: str = ""
    parameters: dict = field(default_factory=dict)  # a JSON Schema (draft 7) object


@dataclass
class ChatMessage:
    role: str  # one of ROLES
    content: str = ""
    name: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None


class TemplateError(ValueError):
    """A conversation Mistral's chat format cannot express; the message is meant for the caller.

    `field` names the request field at fault when one is known, e.g. "messages[3].role".
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
