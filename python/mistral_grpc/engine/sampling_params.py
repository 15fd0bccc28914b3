"""Per-request generation settings, with the ranges of docs/api.md (the hosted endpoints')."""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

MAX_STOP_STRINGS = 16
MAX_N = 8
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class StructuredSpec:
    """A constraint on what a choice may generate (engine/structured.py turns it into a grammar).

    json_object: one JSON object; json_schema: one JSON value valid under `schema`; tool_calls (v0.3):
    the [TOOL_CALLS] token, then a JSON array of calls to the given tools, each with arguments valid
    under its parameters. `schema` is canonical JSON text (keys sorted: google.protobuf.Struct keeps no
    key order), so equal constraints share one compiled grammar and a seed means the same output
    from one process to the next.
    """

    kind: Literal["json_object", "json_schema", "tool_calls"]
    schema: str

    @classmethod
    def json_object(cls) -> "StructuredSpec":
        return cls("json_object", _canonical({"type": "object"}))

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> "StructuredSpec":
        return cls("json_schema", _canonical(schema))

    @classmethod
    def tool_calls(cls, tools: Sequence[tuple[str, dict[str, Any]]], max_calls: int | None = None) -> "StructuredSpec":
        """tools: (name, parameters schema) pairs. Each call is written {"name": ..., "arguments": ...},
        in that order, as Mistral's tool-call format has it; arguments are always an object.
        max_calls: at most this many calls in the array (None = no limit)."""
        calls = [{"type": "object",
                  "properties": {"name": {"const": name}, "arguments": _sorted_keys({"type": "object"} | parameters)},
                  "required": ["name", "arguments"], "additionalProperties": False}
                 for name, parameters in tools]
        array = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if max_calls is not None:
            array["maxItems"] = max_calls
        return cls("tool_calls", json.dumps(array, ensure_ascii=False, separators=(",", ":")))


def _sorted_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _sorted_keys(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(item) for item in value]
    return value


def _canonical(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy, draws no random number
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_tokens: int | None = None  # None = what is left of the context
    stop: tuple[str, ...] = field(default_factory=tuple)
    n: int = 1
    presence_penalty: float = 0.0  # OpenAI: on generated tokens only
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # multiplicative, prompt + generated
    seed: int | None = None  # None = fresh randomness each call
    logprobs: bool = False
    top_logprobs: int = 0
    structured: StructuredSpec | None = None  # None = free text

    def violations(self) -> list[tuple[str, str]]:
        """(field, description) for every out-of-range value; empty when the request is valid."""
        bad: list[tuple[str, str]] = []

        def check(ok: bool, name: str, text: str) -> None:
            if not ok:
                bad.append((name, f"{text} (got {getattr(self, name)!r})"))

        check(0.0 <= self.temperature <= 2.0, "temperature", "must be between 0 and 2")
        check(0.0 < self.top_p <= 1.0, "top_p", "must be greater than 0 and at most 1")
        check(self.top_k >= 0, "top_k", "must be 0 (off) or positive")
        check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be at least 1")
        check(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"allows at most {MAX_STOP_STRINGS} strings")
        check(all(self.stop), "stop", "must not contain empty strings")
        check(1 <= self.n <= MAX_N, "n", f"must be between 1 and {MAX_N}")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be between -2 and 2")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be between -2 and 2")
        check(0.0 < self.repetition_penalty <= 10.0, "repetition_penalty", "must be greater than 0 and at most 10")
        check(self.seed is None or 0 <= self.seed < 2**63, "seed", "must be a non-negative 64-bit integer")
        check(0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}")
        check(self.top_logprobs == 0 or self.logprobs, "top_logprobs", "needs logprobs set to true")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and value != value:
                bad.append((f.name, "must be a number (got NaN)"))
        return bad
