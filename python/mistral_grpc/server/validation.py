"""ChatRequest -> what the template and the engine take, after checking every field.

All violations of one request are collected and reported together (INVALID_ARGUMENT with one
google.rpc.BadRequest field violation each). Sampling ranges live in SamplingParams.violations();
this module checks the rest: the model name, messages, tools, tool_choice and response_format.
Whether a conversation fits the model's template (role order, tool-call ids, function names, tool
schemas) is the template's call: its TemplateError names the field too.
"""

import json
from dataclasses import dataclass

import grpc
from google.protobuf import json_format

from mistral_grpc.engine.sampling_params import SamplingParams
from mistral_grpc.proto.mistral.chat.v1 import chat_pb2
from mistral_grpc.server.errors import RequestError, invalid_argument
from mistral_grpc.tokenizer import ChatMessage, ToolCall, ToolDefinition
from mistral_grpc.tokenizer.messages import ROLES

TOOL_CHOICES = ("none", "auto", "any")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
# The ChatRequest fields that map one to one onto SamplingParams (same names).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "max_tokens", "n", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "seed", "logprobs", "top_logprobs")


@dataclass(frozen=True)
class ParsedRequest:
    messages: list[ChatMessage]
    # None when none are given or tool_choice is "none". "any" offers them as "auto" does: nothing
    # forces the model to call one yet (that needs constrained decoding).
    tools: list[ToolDefinition] | None
    params: SamplingParams


def parse_request(request: chat_pb2.ChatRequest, served_model: str) -> ParsedRequest:
    """Raises RequestError: NOT_FOUND for another model, INVALID_ARGUMENT naming every bad field,
    UNIMPLEMENTED for a valid request this server cannot honour yet."""
    if request.model and request.model != served_model:
        raise RequestError(grpc.StatusCode.NOT_FOUND,
                           f"model {request.model!r} is not served here; this server serves {served_model!r} "
                           "(or leave model empty)")
    violations: list[tuple[str, str]] = []
    messages = _messages(request, violations)
    tools = _tools(request, violations)
    tool_choice = _tool_choice(request, violations)
    _check_response_format(request, violations)
    params = _sampling_params(request)
    violations += params.violations()
    if violations:
        raise invalid_argument(violations)
    if request.HasField("response_format") and request.response_format.type != "text":
        raise RequestError(grpc.StatusCode.UNIMPLEMENTED,
                           f"response_format type {request.response_format.type!r} is not supported yet by this "
                           "server; use type 'text' and ask for JSON in the prompt")
    return ParsedRequest(messages=messages, tools=tools if tool_choice != "none" else None, params=params)


def _messages(request: chat_pb2.ChatRequest, violations: list[tuple[str, str]]) -> list[ChatMessage]:
    if not request.messages:
        violations.append(("messages", "must hold at least one message"))
    messages = []
    for i, message in enumerate(request.messages):
        where = f"messages[{i}]"
        if message.role not in ROLES:
            violations.append((f"{where}.role", f"must be one of {', '.join(ROLES)} (got {message.role!r})"))
        if message.tool_calls and message.role != "assistant":
            violations.append((f"{where}.tool_calls", "only assistant messages carry tool_calls"))
        calls = [_tool_call(call, f"{where}.tool_calls[{j}]", violations) for j, call in enumerate(message.tool_calls)]
        messages.append(ChatMessage(role=message.role, content=message.content, name=message.name or None,
                                    tool_calls=calls, tool_call_id=message.tool_call_id or None))
    return messages


def _tool_call(call: chat_pb2.ToolCall, where: str, violations: list[tuple[str, str]]) -> ToolCall:
    if call.type not in ("", "function"):
        violations.append((f"{where}.type", f"must be 'function' (got {call.type!r})"))
    arguments = call.function.arguments or "{}"
    try:
        if not isinstance(json.loads(arguments), dict):
            violations.append((f"{where}.function.arguments", "must be a JSON object encoded as a string"))
    except json.JSONDecodeError as error:
        violations.append((f"{where}.function.arguments", f"must be a JSON object encoded as a string ({error})"))
    return ToolCall(id=call.id, name=call.function.name, arguments=arguments)


def _tools(request: chat_pb2.ChatRequest, violations: list[tuple[str, str]]) -> list[ToolDefinition] | None:
    tools = []
    seen: set[str] = set()
    for i, tool in enumerate(request.tools):
        where = f"tools[{i}]"
        if tool.type not in ("", "function"):
            violations.append((f"{where}.type", f"must be 'function' (got {tool.type!r})"))
        name = tool.function.name
        if name in seen:
            violations.append((f"{where}.function.name", f"{name!r} is defined twice"))
        seen.add(name)
        parameters = struct_to_dict(tool.function.parameters) if tool.function.HasField("parameters") else {}
        tools.append(ToolDefinition(name=name, description=tool.function.description, parameters=parameters))
    return tools or None


def _tool_choice(request: chat_pb2.ChatRequest, violations: list[tuple[str, str]]) -> str:
    if not request.HasField("tool_choice"):
        return "auto" if request.tools else "none"
    choice = request.tool_choice
    if choice not in TOOL_CHOICES:
        violations.append(("tool_choice", f"must be one of {', '.join(TOOL_CHOICES)} (got {choice!r})"))
    elif choice == "any" and not request.tools:
        violations.append(("tool_choice", "'any' needs at least one tool in tools"))
    return choice


def _check_response_format(request: chat_pb2.ChatRequest, violations: list[tuple[str, str]]) -> None:
    if not request.HasField("response_format"):
        return
    response_format = request.response_format
    if response_format.type not in RESPONSE_FORMATS:
        violations.append(("response_format.type",
                           f"must be one of {', '.join(RESPONSE_FORMATS)} (got {response_format.type!r})"))
    elif response_format.type == "json_schema" and not response_format.json_schema.name:
        violations.append(("response_format.json_schema.name", "type 'json_schema' needs json_schema with a name"))


def _sampling_params(request: chat_pb2.ChatRequest) -> SamplingParams:
    given = {name: getattr(request, name) for name in SAMPLING_FIELDS if request.HasField(name)}
    return SamplingParams(stop=tuple(request.stop), **given)


def struct_to_dict(struct) -> dict:
    """A google.protobuf.Struct as plain JSON data. Struct stores every number as a double; whole
    numbers go back to int so a tool's schema reads as it was sent ("minimum": 1, not 1.0)."""
    return _restore_ints(json_format.MessageToDict(struct))


def _restore_ints(value):
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: _restore_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_restore_ints(item) for item in value]
    return value
