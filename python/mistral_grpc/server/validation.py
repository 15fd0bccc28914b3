"""ChatRequest -> what the template and the engine take, after checking every field.

All violations of one request are collected and reported together (INVALID_ARGUMENT with one
google.rpc.BadRequest field violation each). Sampling ranges live in SamplingParams.violations();
this module checks the rest: the model name, messages, tools, tool_choice and response_format, and
turns the last two into the answer's StructuredSpec (engine/structured.py compiles it). It also takes
what OpenAI-style bodies send (docs/openai-compatibility.md): "required" and the object form of
tool_choice, max_completion_tokens, foreign tool-call ids (mapped to the 9 alphanumerics v0.3 needs).
Whether a conversation fits the model's template (role order, tool-call ids, function names, tool
schemas) is the template's call: its TemplateError names the field too.
"""

import hashlib
import itertools
import json
import math
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, fields

import grpc
import jsonschema
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from mistral_grpc.engine.sampling_params import MAX_STOP_STRINGS, SamplingParams, StructuredSpec
from mistral_grpc.engine.structured import InvalidSchemaError
from mistral_grpc.proto.mistral.chat.v1 import chat_pb2
from mistral_grpc.server.errors import RequestError, invalid_argument
from mistral_grpc.tokenizer import ChatMessage, MistralTokenizer, ToolCall, ToolDefinition
from mistral_grpc.tokenizer.messages import ROLES
from mistral_grpc.tokenizer.validation import TOOL_CALL_ID

# "required" is OpenAI's name for Mistral's "any".
TOOL_CHOICES = ("none", "auto", "any", "required")
_CALL_ID_ALPHABET = string.ascii_letters + string.digits
_FUNCTION_FORM = '{"type": "function", "function": {"name": ...}}'
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
SCHEMA_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for json_schema.name
NO_TOOLS_IN_V1 = ("this model's chat format (Mistral-7B-Instruct v0.1/v0.2) has no tool calls; leave tools out, "
                  "or serve a v0.3 model")
# The ChatRequest fields that map one to one onto SamplingParams (same names).
# (max_tokens has two names: see _max_tokens.)
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "n", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "seed", "logprobs", "top_logprobs")


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "none" | "auto" | "any" (the answer is a call)
    function: str | None = None  # with "any": the one tool the call must be to (OpenAI's object form)


@dataclass(frozen=True)
class ParsedRequest:
    messages: list[ChatMessage]
    # None when none are given or tool_choice is "none"; with "any", params.structured forces a call.
    tools: list[ToolDefinition] | None
    params: SamplingParams
    max_tool_calls: int | None = None  # per choice; 1 with parallel_tool_calls false, else no limit
    prediction: str | None = None  # the predicted reply's text (speculative decoding's drafts), or None


def decode_request(request: bytes | chat_pb2.ChatRequest) -> chat_pb2.ChatRequest:
    """The ChatRequest in a call's raw bytes (the service is registered without a deserializer, so bad
    bytes become INVALID_ARGUMENT here instead of grpc's UNKNOWN naming a Python exception)."""
    if isinstance(request, chat_pb2.ChatRequest):
        return request
    try:
        return chat_pb2.ChatRequest.FromString(request)
    except DecodeError as error:
        text = str(error)
        if any(word in text.lower() for word in ("depth", "nest", "recursion")):
            reason = ("it is nested too deeply (protobuf decodes at most 100 levels, and each level of JSON in a "
                      "google.protobuf.Struct such as response_format.json_schema.schema or "
                      "tools[].function.parameters takes 3): flatten the schema, e.g. with $defs and $ref")
        else:
            reason = f"the bytes are not a valid protobuf encoding ({text.rpartition(': ')[2] or 'unreadable'})"
        name = chat_pb2.ChatRequest.DESCRIPTOR.full_name
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {name}: {reason}") from None


def parse_request(request: chat_pb2.ChatRequest, served_model: str, has_tool_calls: bool = True) -> ParsedRequest:
    """Raises RequestError: NOT_FOUND for another model, INVALID_ARGUMENT naming every bad field.

    has_tool_calls: the served model's chat format has tool calls (v0.3), as tool_choice "any" needs.
    """
    if request.model and request.model != served_model:
        raise RequestError(grpc.StatusCode.NOT_FOUND,
                           f"model {request.model!r} is not served here; this server serves {served_model!r} "
                           "(or leave model empty)")
    violations: list[tuple[str, str]] = []
    messages = _messages(request, violations)
    tools = _tools(request, violations)
    tool_choice = _tool_choice(request, violations, has_tool_calls)
    if request.tools and not has_tool_calls and tool_choice.mode != "any":  # "any" is reported on tool_choice
        violations.append(("tools", NO_TOOLS_IN_V1))
    single_call = request.HasField("parallel_tool_calls") and not request.parallel_tool_calls
    structured = _structured_output(request, tools, tool_choice, single_call, violations)
    max_tokens = _max_tokens(request, violations)
    if request.store:
        violations.append(("store", "this server stores no completions: leave store out or false"))
    params = _sampling_params(request, structured, max_tokens)
    violations += _sampling_violations(params, request.HasField("max_completion_tokens"))
    prediction = _prediction(request, violations)
    if violations:
        raise invalid_argument(violations)
    return ParsedRequest(messages=messages, tools=tools if tool_choice.mode != "none" else None, params=params,
                         max_tool_calls=1 if single_call else None, prediction=prediction)


def compile_grammar(compile_spec: Callable[[StructuredSpec], None], spec: StructuredSpec) -> None:
    """Compiles a request's grammar with the engine's compiler (compile_spec), slow for a big schema (call
    it off the event loop); the engine then finds it in its cache. A schema xgrammar cannot compile is
    INVALID_ARGUMENT naming the field."""
    try:
        compile_spec(spec)
    except InvalidSchemaError as error:
        field = "tools" if spec.kind == "tool_calls" else "response_format.json_schema.schema"
        raise invalid_argument([(field, str(error))]) from error


def _messages(request: chat_pb2.ChatRequest, violations: list[tuple[str, str]]) -> list[ChatMessage]:
    if not request.messages:
        violations.append(("messages", "must hold at least one message"))
    mistral_ids = _mistral_call_ids(request)
    messages = []
    call_ids: set[str] = set()  # of the tool calls made so far, for the tool results to answer
    for i, message in enumerate(request.messages):
        where = f"messages[{i}]"
        if message.role not in ROLES:
            violations.append((f"{where}.role", f"must be one of {', '.join(ROLES)} (got {_shown(message.role)})"))
        if message.tool_calls and message.role != "assistant":
            violations.append((f"{where}.tool_calls", "only assistant messages carry tool_calls"))
        # The template checks an id's form; whether it answers a call is OpenAI's rule, checked here.
        if message.role == "tool" and message.tool_call_id and message.tool_call_id not in call_ids:
            violations.append((f"{where}.tool_call_id", f"{_shown(message.tool_call_id)} matches no tool call of an "
                                                        "earlier assistant message"))
        if message.role == "assistant":
            call_ids.update(call.id for call in message.tool_calls if call.id)
        calls = [_tool_call(call, mistral_ids.get(call.id, call.id), f"{where}.tool_calls[{j}]", violations)
                 for j, call in enumerate(message.tool_calls)]
        tool_call_id = mistral_ids.get(message.tool_call_id, message.tool_call_id)
        messages.append(ChatMessage(role=message.role, content=message.content, name=message.name or None,
                                    tool_calls=calls, tool_call_id=tool_call_id or None))
    return messages


def _mistral_call_ids(request: chat_pb2.ChatRequest) -> dict[str, str]:
    """Foreign tool-call ids (OpenAI's "call_abc123def456") -> the 9 letters or digits v0.3's template
    needs. One id maps to the same 9 characters wherever it appears, distinct ids to distinct ones (none
    equal to an id of the request that is already valid, which stays as it is); the mapping depends on
    the id alone, so the same conversation makes the same prompt (and hits the prefix cache)."""
    ids = dict.fromkeys(call_id for message in request.messages
                        for call_id in (message.tool_call_id, *(call.id for call in message.tool_calls))
                        if call_id and call_id != "null")  # "null": the template's "no id", refused there
    taken = {call_id for call_id in ids if TOOL_CALL_ID.fullmatch(call_id)}
    mapping = {}
    for call_id in (call_id for call_id in ids if call_id not in taken):  # in order: collisions resolve the same way
        mapping[call_id] = next(candidate for attempt in itertools.count()
                                if (candidate := _hashed_call_id(call_id, attempt)) not in taken)
        taken.add(mapping[call_id])
    return mapping


def _hashed_call_id(call_id: str, attempt: int) -> str:
    digest = hashlib.sha256(f"{attempt}:{call_id}".encode()).digest()
    return "".join(_CALL_ID_ALPHABET[byte % len(_CALL_ID_ALPHABET)] for byte in digest[:9])


def _tool_call(call: chat_pb2.ToolCall, call_id: str, where: str, violations: list[tuple[str, str]]) -> ToolCall:
    if call.type not in ("", "function"):
        violations.append((f"{where}.type", f"must be 'function' (got {call.type!r})"))
    arguments = call.function.arguments or "{}"
    try:
        if not isinstance(json.loads(arguments), dict):
            violations.append((f"{where}.function.arguments", "must be a JSON object encoded as a string"))
    except json.JSONDecodeError as error:
        violations.append((f"{where}.function.arguments", f"must be a JSON object encoded as a string ({error})"))
    return ToolCall(id=call_id, name=call.function.name, arguments=arguments)


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


def _tool_choice(request: chat_pb2.ChatRequest, violations: list[tuple[str, str]], has_tool_calls: bool) -> ToolChoice:
    given = _given_tool_choice(request, violations)
    if given is None:
        return ToolChoice("auto" if request.tools else "none")
    choice = _parsed_tool_choice(given, request, violations)
    if choice is None:
        return ToolChoice("none")
    shown = f"a call to {choice.function!r}" if choice.function else repr(given)
    if not request.tools:  # as OpenAI: tool_choice only goes with tools
        violations.append(("tool_choice", f"{shown} needs at least one tool in tools (or leave tool_choice out)"))
    elif choice.mode == "any" and not has_tool_calls:
        violations.append(("tool_choice", f"{shown} needs a model with tool calls (Mistral-7B-Instruct v0.3); this "
                                          "model's chat format (v0.1/v0.2) has none"))
    return choice


def _given_tool_choice(request: chat_pb2.ChatRequest, violations: list[tuple[str, str]]) -> str | dict | None:
    """tool_choice as sent (a string or an object), from the field or from the deprecated string field;
    None when neither is set (a JSON null is unset, as OpenAI takes it)."""
    value = (json_format.MessageToDict(request.tool_choice) if request.HasField("tool_choice")
             and request.tool_choice.WhichOneof("kind") != "null_value" else None)
    if request.HasField("tool_choice_string"):
        if value is not None:
            violations.append(("tool_choice", "is set twice: also in the deprecated tool_choice_string (field 15); "
                                              "set tool_choice only"))
        return value if value is not None else request.tool_choice_string
    return value


def _parsed_tool_choice(given: str | dict | object, request: chat_pb2.ChatRequest,
                        violations: list[tuple[str, str]]) -> ToolChoice | None:
    """None (and a violation) when the value is not one tool_choice can take."""
    if isinstance(given, str):
        if given not in TOOL_CHOICES:
            violations.append(("tool_choice", f"must be one of {', '.join(TOOL_CHOICES)}, or {_FUNCTION_FORM} "
                                              f"(got {_shown(given)})"))
            return None
        return ToolChoice("any" if given == "required" else given)
    function = given.get("function") if isinstance(given, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(given, dict) or given.get("type") != "function" or not isinstance(name, str) or (
            given.keys() - {"type", "function"} or function.keys() - {"name"}):
        violations.append(("tool_choice", f"must be one of {', '.join(TOOL_CHOICES)}, or {_FUNCTION_FORM} "
                                          f"(got {_shown(json.dumps(given))})"))
        return None
    if request.tools and name not in {tool.function.name for tool in request.tools}:
        violations.append(("tool_choice.function.name", f"{_shown(name)} is not the name of a tool in tools"))
        return None
    return ToolChoice("any", name)


def _structured_output(request: chat_pb2.ChatRequest, tools: list[ToolDefinition] | None, tool_choice: ToolChoice,
                       single_call: bool, violations: list[tuple[str, str]]) -> StructuredSpec | None:
    """The constraint on the answer: a tool call for tool_choice "any" (to the named tool only, when
    one is named; one call only with parallel_tool_calls false), else the response_format's JSON."""
    response_format = request.response_format
    kind = response_format.type if request.HasField("response_format") else "text"
    if kind not in RESPONSE_FORMATS:
        violations.append(("response_format.type",
                           f"must be one of {', '.join(RESPONSE_FORMATS)} (got {_shown(kind)})"))
        return None
    if kind != "json_schema" and response_format.HasField("json_schema"):
        violations.append(("response_format.json_schema", f"goes only with type 'json_schema' (type is {kind!r})"))
    if tool_choice.mode == "any":
        if kind != "text":
            violations.append(("response_format.type", "must be 'text' with tool_choice 'any' (the answer is then "
                                                       "a tool call)"))
        callable_tools = [tool for tool in tools or [] if tool_choice.function in (None, tool.name)]
        return _tool_calls(callable_tools, single_call, violations)
    if kind == "json_object":
        return StructuredSpec.json_object()
    if kind == "json_schema":
        return _json_schema(response_format.json_schema, violations)
    return None


def _tool_calls(tools: list[ToolDefinition], single_call: bool,
                violations: list[tuple[str, str]]) -> StructuredSpec | None:
    if not tools:
        return None  # _tool_choice reported it
    for i, tool in enumerate(tools):
        if tool.parameters.get("type", "object") != "object":
            violations.append((f"tools[{i}].function.parameters",
                               "must describe an object (type 'object') for tool_choice 'any' to call it"))
    return StructuredSpec.tool_calls([(tool.name, tool.parameters) for tool in tools],
                                     max_calls=1 if single_call else None)


def _json_schema(json_schema: chat_pb2.JsonSchema, violations: list[tuple[str, str]]) -> StructuredSpec | None:
    name = json_schema.name
    if not name:
        violations.append(("response_format.json_schema.name", "type 'json_schema' needs json_schema with a name"))
    elif not SCHEMA_NAME.fullmatch(name):
        violations.append(("response_format.json_schema.name", "must be 1 to 64 letters, digits, underscores or "
                                                               f"dashes (got {_shown(name)})"))
    if not json_schema.HasField("schema"):
        violations.append(("response_format.json_schema.schema", "type 'json_schema' needs a schema"))
        return None
    schema = struct_to_dict(json_schema.schema)
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as error:
        violations.append(("response_format.json_schema.schema", f"is not a valid JSON Schema: {error.message}"))
        return None
    return StructuredSpec.json_schema(schema)


def _prediction(request: chat_pb2.ChatRequest, violations: list[tuple[str, str]]) -> str | None:
    """The predicted reply's text; None without one (an empty content predicts nothing)."""
    if not request.HasField("prediction"):
        return None
    if request.prediction.type != "content":
        violations.append(("prediction.type", f"must be 'content' (got {_shown(request.prediction.type)})"))
    return request.prediction.content or None


def prediction_tokens(tokenizer: MistralTokenizer, text: str, context: int) -> tuple[int, ...]:
    """The prediction's tokens as the reply would hold them (at its start, where the leading space
    goes); INVALID_ARGUMENT on prediction.content when they are more than the context holds."""
    if len(text) > context * tokenizer.max_token_chars:  # too long by its characters alone: spare the encoding
        raise invalid_argument([("prediction.content", f"holds {len(text)} characters, more than a context of "
                                                       f"{context} tokens can take")])
    tokens = tokenizer.encode(text)
    if len(tokens) > context:
        raise invalid_argument([("prediction.content", f"is {len(tokens)} tokens long, more than the context of "
                                                       f"{context} tokens")])
    return tuple(tokens)


def _max_tokens(request: chat_pb2.ChatRequest, violations: list[tuple[str, str]]) -> int | None:
    """max_tokens, or max_completion_tokens (OpenAI's newer name for it); both given must agree."""
    given = {name: getattr(request, name) for name in ("max_tokens", "max_completion_tokens") if request.HasField(name)}
    if len(set(given.values())) > 1:
        violations.append(("max_completion_tokens", "is OpenAI's newer name for max_tokens: set one of them, or both "
                                                    f"to the same value (got max_tokens {request.max_tokens}, "
                                                    f"max_completion_tokens {request.max_completion_tokens})"))
    return next(iter(given.values()), None)


def _sampling_params(request: chat_pb2.ChatRequest, structured: StructuredSpec | None,
                     max_tokens: int | None) -> SamplingParams:
    given = {name: getattr(request, name) for name in SAMPLING_FIELDS if request.HasField(name)}
    return SamplingParams(stop=tuple(request.stop), structured=structured, max_tokens=max_tokens, **given)


def _sampling_violations(params: SamplingParams, max_tokens_named_completion: bool) -> list[tuple[str, str]]:
    """SamplingParams' violations, one per field: NaN is just "must be a number", and stop says how many
    strings there are and which is empty, never the whole list (it can be megabytes). A bad max_tokens
    is reported on max_completion_tokens when that is the name the request used."""
    by_field: dict[str, list[str]] = {}
    for name, description in params.violations():
        by_field.setdefault(name, []).append(description)
    nan = {f.name for f in fields(params) if isinstance(value := getattr(params, f.name), float) and math.isnan(value)}
    merged = []
    for name, descriptions in by_field.items():
        if name in nan:
            descriptions = ["must be a number (got NaN)"]
        elif name == "stop":
            descriptions = _stop_problems(params.stop) or descriptions
        if name == "max_tokens" and max_tokens_named_completion:
            name = "max_completion_tokens"
        merged.append((name, "; ".join(dict.fromkeys(descriptions))))
    return merged


def _stop_problems(stop: tuple[str, ...]) -> list[str]:
    problems = []
    if len(stop) > MAX_STOP_STRINGS:
        problems.append(f"allows at most {MAX_STOP_STRINGS} strings (got {len(stop)})")
    empty = [i for i, text in enumerate(stop) if not text]
    if empty:
        problems.append(f"must not contain empty strings (stop[{empty[0]}] is empty)")
    return problems


def _shown(text: str, limit: int = 40) -> str:
    """A client's string for a message: quoted, and cut short (a field may be megabytes long)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


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
