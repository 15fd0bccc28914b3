"""v0.3 tool-call output -> ToolCall objects (OpenAI shape: 9-character ids, arguments as JSON text)."""

from __future__ import annotations

import json
import secrets
import string

from mistral_grpc.tokenizer.messages import ToolCall
from mistral_grpc.tokenizer.validation import FUNCTION_NAME

_ID_ALPHABET = string.ascii_letters + string.digits


def new_tool_call_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """What a v0.3 model wrote after its [TOOL_CALLS] token -> ("", calls), or (text, []) if malformed.

    The model writes `[{"name": ..., "arguments": {...}}, ...]` (one bare object is accepted too).
    Anything else, including trailing text after the JSON, is left to the caller as content.
    """
    try:
        value, end = json.JSONDecoder().raw_decode(text.strip())
    except (ValueError, RecursionError):
        return text, []
    if text.strip()[end:].strip():
        return text, []
    items = value if isinstance(value, list) else [value]
    calls = [_as_call(item) for item in items]
    if not calls or None in calls:
        return text, []
    return "", calls


def _as_call(item: object) -> ToolCall | None:
    if not isinstance(item, dict):
        return None
    name, arguments = item.get("name"), item.get("arguments", {})
    if not isinstance(name, str) or not FUNCTION_NAME.match(name):
        return None
    if isinstance(arguments, str):  # some outputs carry the arguments as JSON text already
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(id=new_tool_call_id(), name=name, arguments=json.dumps(arguments, ensure_ascii=False))
