"""Which conversations Mistral's chat format accepts: mistral-common's validator (serving mode).

The rules, their order and their quirks follow mistral-common's MistralRequestValidator (v1) and
MistralRequestValidatorV3 (v3) so a request is refused exactly when Mistral's reference refuses it;
only the messages are rewritten for people, with the offending field named.
"""

from __future__ import annotations

import re

from mistral_grpc.tokenizer.messages import ROLES, ChatMessage, TemplateError, ToolDefinition

FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
TOOL_CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
_MAY_FOLLOW = {
    "system": ("user", "assistant", "system"),
    "user": ("assistant", "system", "user"),
    "assistant": ("assistant", "user", "tool"),
    "tool": ("assistant", "tool", "user"),
}


def check_conversation(messages: list[ChatMessage], tools: list[ToolDefinition] | None, version: str) -> None:
    _check_structure(messages)
    for index, message in enumerate(messages):
        _check_message(index, message, version)
    for index, tool in enumerate(tools or []):
        _check_tool(index, tool)


def _check_structure(messages: list[ChatMessage]) -> None:
    if not messages:
        raise TemplateError("the conversation needs at least one message", "messages")
    for index, message in enumerate(messages):
        if message.role not in ROLES:
            raise TemplateError(
                f"role {message.role!r} is not one of {', '.join(ROLES)}", f"messages[{index}].role"
            )
    if len(messages) == 1 and messages[0].role not in ("user", "system"):
        raise TemplateError("a one-message conversation must be a user or system message", "messages[0].role")
    last = len(messages) - 1
    if last > 0 and messages[last].role == "assistant":
        raise TemplateError(
            "the conversation must end with a user or tool message for the assistant to answer",
            f"messages[{last}].role",
        )
    for index in range(1, len(messages)):
        previous, role = messages[index - 1].role, messages[index].role
        if role not in _MAY_FOLLOW[previous]:
            raise TemplateError(
                f"a message with role {role!r} cannot follow one with role {previous!r}", f"messages[{index}].role"
            )
    _check_tool_results_match_calls(messages)


def _check_tool_results_match_calls(messages: list[ChatMessage]) -> None:
    """Between two assistant messages, as many tool messages as the first one made tool calls."""
    expected, caller, surplus = 0, None, None
    # mistral-common starts counting at the second message: calls in a first message are never
    # matched against results.
    for index in range(1, len(messages)):
        message = messages[index]
        if message.role == "tool":
            expected -= 1
            if expected < 0 and surplus is None:
                surplus = index
        elif message.role == "assistant":
            _check_count(expected, caller, surplus)
            expected, caller, surplus = len(message.tool_calls), index, None
    _check_count(expected, caller, surplus)


def _check_count(expected: int, caller: int | None, surplus: int | None) -> None:
    if expected > 0:
        raise TemplateError(
            f"messages[{caller}] makes {expected} more tool call(s) than the tool messages after it answer",
            f"messages[{caller}].tool_calls",
        )
    if surplus is not None:
        raise TemplateError(
            f"messages[{surplus}] is a tool result with no tool call left to answer", f"messages[{surplus}].role"
        )


def _check_message(index: int, message: ChatMessage, version: str) -> None:
    where = f"messages[{index}]"
    if message.role == "assistant":
        if bool(message.content) == bool(message.tool_calls):
            raise TemplateError(
                "an assistant message needs either content or tool_calls, not both and not neither",
                f"{where}.content",
            )
        for number, call in enumerate(message.tool_calls):
            if version == "v3":
                _check_call_id(call.id, f"{where}.tool_calls[{number}].id")
            _check_function_name(call.name, f"{where}.tool_calls[{number}].function.name")
    elif message.role == "tool":
        if message.name:
            _check_function_name(message.name, f"{where}.name")
        if version == "v3":
            _check_call_id(message.tool_call_id, f"{where}.tool_call_id")


def _check_call_id(call_id: str | None, field: str) -> None:
    if not call_id or call_id == "null":
        raise TemplateError("a tool call id is required (9 letters or digits)", field)
    if not TOOL_CALL_ID.match(call_id):
        raise TemplateError(f"tool call id {call_id!r} must be exactly 9 letters or digits", field)


def _check_function_name(name: str, field: str) -> None:
    if not FUNCTION_NAME.match(name):
        raise TemplateError(
            f"function name {name!r} must be 1 to 64 letters, digits, underscores or dashes", field
        )


def _check_tool(index: int, tool: ToolDefinition) -> None:
    import jsonschema  # on first use: the engine's GPU check runs where jsonschema is not installed

    where = f"tools[{index}].function"
    try:
        jsonschema.Draft7Validator.check_schema(tool.parameters)
    except jsonschema.exceptions.SchemaError as error:
        raise TemplateError(
            f"parameters is not a valid JSON Schema: {error.message}", f"{where}.parameters"
        ) from error
    _check_function_name(tool.name, f"{where}.name")
