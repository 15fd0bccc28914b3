"""Structured output: grammars compiled against the tokenizer's vocabulary, one matcher per choice, and
the batch's token bitmask that the sampler applies before drawing (ops.apply_token_bitmask).

xgrammar does the grammar work. Its vocabulary is built from our own tokenizer: each token's surface
bytes exactly as the detokenizer emits them (SentencePiece's ▁ as a space, <0xNN> as one byte) and
b"" for control tokens, which xgrammar then never allows; the stop token is EOS. The grammar is
` `? then the JSON: SentencePiece drops the leading space of an answer's first token, so " {" may open
the answer just as "{" may. Only a token whose space is dropped may open it, though: the byte token
<0x20> (and any other whose space the detokenizer keeps) is masked at the first step, so the content
never starts with a space. The JSON is laid out as json.dumps does (", " and ": ", no other
whitespace), which is how Mistral's tool calls are written, and leaves a model no blank space to loop
on. A choice that reaches max_tokens mid-object ends with "length" and partial JSON.

xgrammar 0.2.8 silently ignores part of JSON Schema (and a schema it ignores in part gives output
that breaks it), so every schema is first checked by `unenforceable`, which names what would be
ignored; each rule there was established by compiling probe schemas and comparing the grammar's
verdict on instances with jsonschema's.
"""

import importlib
import json
import logging
import re
import sys
import types
from collections.abc import Iterator, Sequence
from functools import cache, lru_cache
from typing import Any

import jsonschema
import torch

from mistral_grpc.engine.sampling_params import StructuredSpec
from mistral_grpc.tokenizer import MistralTokenizer

log = logging.getLogger(__name__)

CACHE_BYTES = 256 * 2**20  # compiled grammars kept for reuse; the least recently used go first
_XGRAMMAR_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[12:00:00] /project/cpp/x.cc:42: " before a message
_BOUNDED_STRING_CHARACTER = r'[^\"\\\r\n]'
_JSON_STRING_CHARACTER = r'[^\0-\x1f\"\\]'


def _import_xgrammar() -> types.ModuleType:
    """xgrammar imports transformers at import time, only for its Hugging Face helpers, which this
    server never calls (the vocabulary comes from our tokenizer). A stand-in takes transformers'
    place while xgrammar loads, so serving does not pay transformers' import (~2 s, ~50 MB)."""
    if "transformers" in sys.modules:
        return importlib.import_module("xgrammar")
    stand_in = types.ModuleType("transformers")
    for name in ("PreTrainedTokenizerBase", "PreTrainedTokenizerFast", "LogitsProcessor"):
        setattr(stand_in, name, type(name, (), {}))
    sys.modules["transformers"] = stand_in
    try:
        return importlib.import_module("xgrammar")
    finally:
        del sys.modules["transformers"]  # a later `import transformers` gets the real one


xgr = _import_xgrammar()


class InvalidSchemaError(ValueError):
    """The constraint cannot be compiled into a grammar; the message says why, for the caller."""


class GrammarState:
    """One choice's progress through its grammar. Advanced once per generated token: a preempted
    choice recomputes its KV cache but keeps its tokens, so its state stays valid. Draft tokens
    (speculative decoding) advance it only while their masks are filled, then are rolled back."""

    def __init__(self, grammar: "xgr.CompiledGrammar", forced: Sequence[int] = ()) -> None:
        self.matcher = xgr.GrammarMatcher(grammar)
        self._forced = list(forced)  # control tokens the output must open with, before the grammar's text
        self.started = False  # the grammar has accepted a token: the answer's text has begun

    @property
    def forced_token(self) -> int | None:
        return self._forced[0] if self._forced else None

    def accept(self, token: int) -> bool:
        """Feeds a generated token (never EOS: it ends the choice); False if the grammar forbids it."""
        if self._forced:
            return token == self._forced.pop(0)
        accepted = self.matcher.accept_token(token)
        self.started = self.started or accepted
        return accepted

    def fill_masks(self, mask: torch.Tensor, first_row: int, drafts: Sequence[int], eos_id: int,
                   first_step: torch.Tensor) -> None:
        """Fills rows first_row .. first_row + len(drafts) with what may come next at the state now and
        after each draft in turn, then rewinds: row j is the mask one-at-a-time decoding fills once
        drafts[:j] are its tokens. Past a draft that cannot follow (or EOS, which ends the choice) the
        rows allow everything: that draft's own row forbids it, so they are never used."""
        forced, started = list(self._forced), self.started
        advanced = 0
        for j in range(len(drafts) + 1):
            row = first_row + j
            if self._forced:
                _allow_only(mask[row], self._forced[0])
            else:
                self.matcher.fill_next_token_bitmask(mask, row)
                if not self.started:
                    mask[row] &= first_step
            if j == len(drafts) or drafts[j] == eos_id or not _allows(mask[row], drafts[j]):
                mask[first_row + j + 1:first_row + len(drafts) + 1] = -1
                break
            matched_forced = bool(self._forced)
            if not self.accept(drafts[j]):
                raise RuntimeError(f"the grammar allowed token {drafts[j]} and then refused it")
            advanced += not matched_forced
        self.matcher.rollback(advanced)
        self._forced, self.started = forced, started


class GrammarCompiler:
    """Compiles StructuredSpecs for one tokenizer; a spec compiled before comes from the cache."""

    def __init__(self, tokenizer: MistralTokenizer) -> None:
        self.vocab_size = tokenizer.vocab_size
        self.eos_id = tokenizer.eos_id
        self.tool_calls_token_id = tokenizer.tool_calls_token_id
        surfaces = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        info = xgr.TokenizerInfo(surfaces, xgr.VocabType.RAW, vocab_size=tokenizer.vocab_size,
                                 stop_token_ids=[tokenizer.eos_id])
        self._compiler = xgr.GrammarCompiler(info, cache_limit_bytes=CACHE_BYTES)
        # The grammar's optional leading space is there for the tokens whose space the detokenizer
        # drops at the start of an answer ("▁{" -> "{"); a token that keeps it (<0x20>) would make
        # the content start with " ", so those are masked at an answer's first step.
        self._first_step = xgr.allocate_token_bitmask(1, tokenizer.vocab_size)[0]
        for token, surface in enumerate(surfaces):
            if surface.startswith(b" ") and tokenizer.decode([token]).startswith(" "):
                self._first_step[token // 32] &= ~_bit(token)

    def compile(self, spec: StructuredSpec) -> "xgr.CompiledGrammar":
        """Raises InvalidSchemaError naming what xgrammar cannot turn into a grammar. The schema is
        taken to be valid JSON Schema (the server checks that first, with the field to blame)."""
        if spec.kind == "tool_calls" and self.tool_calls_token_id is None:
            raise InvalidSchemaError("this model's chat format (v1) has no tool calls")
        if problems := unenforceable(spec.schema):
            where = _tool_parameters if spec.kind == "tool_calls" else lambda pointer: pointer or "/"
            raise InvalidSchemaError("cannot enforce this schema: " + "; ".join(
                f"{keyword} at {where(pointer)} {why}" for keyword, pointer, why in problems))
        return self._compiler.compile_grammar(grammar_text(spec.schema))

    def new_states(self, spec: StructuredSpec, n: int) -> list[GrammarState]:
        """One state per choice of a request (compiled once)."""
        grammar = self.compile(spec)
        forced = [self.tool_calls_token_id] if spec.kind == "tool_calls" else []
        return [GrammarState(grammar, forced) for _ in range(n)]

    def bitmask(self, states: Sequence[GrammarState | None],
                drafts: Sequence[Sequence[int]] | None = None) -> torch.Tensor | None:
        """int32 [rows, ceil(V / 32)] on the CPU: each constrained row's allowed next tokens, all ones
        for a row without a grammar; None when no row has one. With drafts (speculative decoding),
        each state has 1 + len(its drafts) rows: the next token's, then one after each draft."""
        if all(state is None for state in states):
            return None
        drafts = drafts if drafts is not None else [()] * len(states)
        mask = xgr.allocate_token_bitmask(sum(1 + len(d) for d in drafts), self.vocab_size)
        first_row = 0
        for state, state_drafts in zip(states, drafts, strict=True):
            # One row at a time: xgrammar's threaded batch fill costs more than it saves on the few
            # cores a CPU server shares with the model.
            if state is not None:
                state.fill_masks(mask, first_row, state_drafts, self.eos_id, self._first_step)
            first_row += 1 + len(state_drafts)
        for i in (mask == 0).all(dim=1).nonzero().flatten().tolist():
            # A schema with no way to go on from here (contradictory constraints): end the choice
            # rather than sample from nothing.
            log.warning("structured output reached a dead end; ending the choice")
            _allow_only(mask[i], self.eos_id)
        return mask


@lru_cache(maxsize=1024)
def grammar_text(schema: str) -> str:
    """The EBNF of the answer for a schema (canonical JSON text): an optional space, then the JSON.
    It is the key of xgrammar's cache of compiled grammars."""
    try:
        json_grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=(", ", ": "))
    except RuntimeError as error:
        raise InvalidSchemaError(f"cannot constrain output to this schema: "
                                 f"{_XGRAMMAR_LOCATION.sub('', str(error).strip())}") from error
    # xgrammar 0.2.8 lets raw control characters into strings with minLength / maxLength, which
    # makes invalid JSON (xgrammar issue #800): give those strings JSON's own character class.
    ebnf = str(json_grammar).replace(_BOUNDED_STRING_CHARACTER, _JSON_STRING_CHARACTER)
    return str(xgr.Grammar.concat(xgr.Grammar.from_ebnf('root ::= " "?'), xgr.Grammar.from_ebnf(ebnf)))


def _bit(token: int) -> int:
    """token's bit in its int32 word of a bitmask (the same bit pattern, as a signed value)."""
    bit = 1 << (token % 32)
    return bit - 2**32 if bit >= 2**31 else bit


def _allows(row: torch.Tensor, token: int) -> bool:
    return bool(int(row[token // 32]) & _bit(token))


def _allow_only(row: torch.Tensor, token: int) -> None:
    row.zero_()
    row[token // 32] = _bit(token)


@cache
def grammar_compiler(tokenizer: MistralTokenizer) -> GrammarCompiler:
    """The compiler (and so the cache) of one tokenizer, shared by the server, which compiles each
    request's grammar off the event loop, and the engine, which then finds it compiled."""
    return GrammarCompiler(tokenizer)


# ---- what xgrammar 0.2.8 would ignore ----------------------------------------------------------
# Each set below comes from probe schemas compiled as grammar_text does, the grammar's verdict on
# valid and invalid instances compared with jsonschema's. A keyword that xgrammar ignores makes it
# accept output the schema rejects; keywords it enforces, or enforces more strictly (patterns taken
# as anchored, formats), are fine. Keywords outside ASSERTIONS (title, description, default, $id,
# $schema, $comment, examples, unknown ones ...) assert nothing for jsonschema either.

# Ignored wherever they appear (true/any value): output need not satisfy them.
_IGNORED = {"uniqueItems": "is not supported", "contains": "is not supported", "not": "is not supported",
            "if": "is not supported (nor then/else)", "dependentRequired": "is not supported",
            "dependentSchemas": "is not supported", "dependencies": "is not supported",
            "$dynamicRef": "is not supported", "$recursiveRef": "is not supported"}
# Enforced only where "type" names a type they apply to: {"minimum": 3} alone lets 1 through.
_NEEDS_TYPE = {keyword: types for types, keywords in (
    (("integer", "number"), ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")),
    (("string",), ("minLength", "maxLength", "pattern")),
    (("array",), ("minItems", "maxItems")),
    (("object",), ("minProperties", "maxProperties", "propertyNames")),
) for keyword in keywords}
# What jsonschema checks (all drafts); the rest of a schema's keys are annotations to both.
ASSERTIONS = frozenset(_IGNORED) | frozenset(_NEEDS_TYPE) | {
    "type", "enum", "const", "$ref", "anyOf", "oneOf", "allOf", "properties", "patternProperties",
    "additionalProperties", "unevaluatedProperties", "required", "items", "prefixItems", "additionalItems",
    "unevaluatedItems", "minContains", "maxContains", "then", "else"}
_COMBINATORS = ("anyOf", "oneOf", "allOf")
_MULTIPLE_OF_MAX = 1024  # xgrammar ignores an integer multipleOf above this (its modulo automaton's size)
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SCHEMA_VALUES = ("items", "additionalProperties", "unevaluatedProperties", "unevaluatedItems", "propertyNames",
                  "additionalItems")
_TOOL_ARGUMENTS = re.compile(r"^/items/anyOf/(\d+)/properties/arguments")  # StructuredSpec.tool_calls' layout

Problem = tuple[str, str, str]  # (keyword, JSON pointer of the schema holding it, why)


@lru_cache(maxsize=1024)
def unenforceable(schema: str) -> tuple[Problem, ...]:
    """The keywords of a schema (canonical JSON text) that xgrammar would not enforce, with where they
    are; () when the grammar keeps every output valid under the schema."""
    root = json.loads(schema)
    validator = jsonschema.validators.validator_for(root, default=jsonschema.Draft202012Validator)(root)
    return tuple(_walk(root, "", _Context(root, validator), nested_id=False))


class _Context:
    def __init__(self, root: Any, validator: jsonschema.protocols.Validator) -> None:
        self.root = root
        self.validator = validator  # resolves $ref against the root when checking enum values

    def resolve(self, node: Any, depth: int = 0) -> Any:
        """node with local $refs followed (None where one cannot be: xgrammar or the walk reports it)."""
        while isinstance(node, dict) and isinstance(node.get("$ref"), str) and depth < 32:
            ref, depth = node["$ref"], depth + 1
            if not (ref == "#" or ref.startswith("#/")):
                return None
            node = self.root
            for part in filter(None, ref[2:].split("/")):
                part = part.replace("~1", "/").replace("~0", "~")
                try:
                    node = node[int(part)] if isinstance(node, list) else node[part]
                except (KeyError, IndexError, ValueError, TypeError):
                    return None
        return node


def _walk(node: Any, pointer: str, context: _Context, nested_id: bool) -> Iterator[Problem]:
    if not isinstance(node, dict):
        return  # true / false: xgrammar handles both (false it refuses, naming it)
    nested_id = nested_id or (bool(pointer) and "$id" in node)
    assertions = ASSERTIONS.intersection(node)
    for keyword in ("$defs", "definitions"):  # checked wherever they are: any $ref may lead there
        for name, subschema in _schema_map(node.get(keyword)):
            yield from _walk(subschema, f"{pointer}/{keyword}/{_escape(name)}", context, nested_id)
    if "enum" in node or "const" in node:
        # xgrammar emits one of the listed values and ignores every other keyword beside them, so the
        # schema holds when each value satisfies the rest of it.
        yield from _check_values(node, pointer, context)
        return
    if "$ref" in node:
        ref = node["$ref"]
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            yield "$ref", pointer, f"is {ref!r}: only '#' and '#/...' JSON pointers are supported"
        elif nested_id:
            yield "$ref", pointer, "is not supported inside a subschema with its own $id (it resolves against the root)"
        for keyword in sorted(assertions - {"$ref"}):
            yield keyword, pointer, "beside $ref is not supported (xgrammar ignores it): move it into the target"
        return
    present = [keyword for keyword in _COMBINATORS if keyword in node]
    if present:
        for keyword in sorted(assertions - set(present)) + present[1:]:
            yield keyword, pointer, (f"beside {present[0]} is not supported (xgrammar ignores it): "
                                     "move it into each branch")
        if len(node.get("allOf") or ()) > 1:
            yield "allOf", pointer, "with more than one schema is not supported (xgrammar enforces none of them)"
        if isinstance(node.get("oneOf"), list):
            yield from _check_one_of(node["oneOf"], pointer, context)
        yield from _walk_children(node, pointer, context, nested_id)
        return  # every other assertion here is reported above
    for keyword in sorted(assertions.intersection(_IGNORED)):
        if keyword == "uniqueItems" and node[keyword] is False:
            continue  # asserts nothing
        yield keyword, pointer, _IGNORED[keyword]
    types = node.get("type", [])
    types = {types} if isinstance(types, str) else set(types) if isinstance(types, list) else set()
    if pointer.endswith("/propertyNames") and not types:
        types = {"string"}  # xgrammar constrains property names as strings whether or not "type" says so
    for keyword in sorted(assertions.intersection(_NEEDS_TYPE)):
        if not types:
            needs = " or ".join(_NEEDS_TYPE[keyword])
            yield keyword, pointer, f'needs a "type" ({needs}): xgrammar ignores it without one'
    if "multipleOf" in node and types & {"integer", "number"}:
        value = node["multipleOf"]
        if "number" in types:
            yield "multipleOf", pointer, "is supported for type integer only (xgrammar ignores it on numbers)"
        elif not (isinstance(value, (int, float)) and float(value).is_integer() and 0 < value <= _MULTIPLE_OF_MAX):
            yield "multipleOf", pointer, (f"must be a whole number from 1 to {_MULTIPLE_OF_MAX} "
                                          "(xgrammar ignores others)")
    if isinstance(node.get("required"), list):
        properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        for name in node["required"]:
            if name not in properties:
                yield "required", pointer, f"names {name!r}, which is not in properties (xgrammar does not enforce it)"
    yield from _walk_children(node, pointer, context, nested_id)


def _walk_children(node: dict, pointer: str, context: _Context, nested_id: bool) -> Iterator[Problem]:
    for keyword in ("properties", "patternProperties"):
        for name, subschema in _schema_map(node.get(keyword)):
            yield from _walk(subschema, f"{pointer}/{keyword}/{_escape(name)}", context, nested_id)
    for keyword in _SCHEMA_LISTS:
        if isinstance(node.get(keyword), list):
            for i, subschema in enumerate(node[keyword]):
                yield from _walk(subschema, f"{pointer}/{keyword}/{i}", context, nested_id)
    for keyword in _SCHEMA_VALUES:
        if keyword in node:
            yield from _walk(node[keyword], f"{pointer}/{keyword}", context, nested_id)


def _check_values(node: dict, pointer: str, context: _Context) -> Iterator[Problem]:
    for keyword in ("const", "enum"):
        if keyword not in node:
            continue
        rest = {key: value for key, value in node.items() if key != keyword}
        if not ASSERTIONS.intersection(rest):
            continue
        values = [node[keyword]] if keyword == "const" else node[keyword] if isinstance(node[keyword], list) else []
        checker = context.validator.evolve(schema=rest)
        for value in values:
            if not checker.is_valid(value):
                yield keyword, pointer, (f"value {json.dumps(value)} breaks the schema's other keywords, which "
                                         f"xgrammar ignores beside {keyword}: leave it out")


def _check_one_of(branches: list, pointer: str, context: _Context) -> Iterator[Problem]:
    """xgrammar treats oneOf as anyOf, which is the same only when no output can match two branches:
    provably so when the branches' types, their values (const / enum) or a required discriminator
    property with const / enum values tell them apart."""
    resolved = [context.resolve(branch) for branch in branches]
    for i in range(len(resolved)):
        for j in range(i + 1, len(resolved)):
            if not _disjoint(resolved[i], resolved[j], context):
                yield "oneOf", pointer, (f"branches {i} and {j} may both match, and xgrammar enforces oneOf as "
                                         "anyOf: use anyOf, or tell them apart by type, const/enum or a required "
                                         "const property")
                return


def _disjoint(a: Any, b: Any, context: _Context) -> bool:
    if not isinstance(a, dict) or not isinstance(b, dict):
        return False
    values_a, values_b = _values(a), _values(b)
    if values_a is not None and values_b is not None:
        return not any(_same(x, y) for x in values_a for y in values_b)
    types_a, types_b = _types(a, values_a), _types(b, values_b)
    if types_a is not None and types_b is not None and not _types_overlap(types_a, types_b):
        return True
    if types_a == types_b == {"object"}:
        properties_a, properties_b = a.get("properties") or {}, b.get("properties") or {}
        for name in set(a.get("required") or ()) & set(b.get("required") or ()):
            tag_a, tag_b = (_values(context.resolve(p.get(name))) if isinstance(p, dict) else None
                            for p in (properties_a, properties_b))
            if tag_a is not None and tag_b is not None and not any(_same(x, y) for x in tag_a for y in tag_b):
                return True
    return False


def _values(node: Any) -> list | None:
    if not isinstance(node, dict):
        return None
    if "const" in node:
        return [node["const"]]
    return node["enum"] if isinstance(node.get("enum"), list) else None


def _types(node: dict, values: list | None) -> set[str] | None:
    if values is not None:
        return {_json_type(value) for value in values}
    types = node.get("type")
    return {types} if isinstance(types, str) else set(types) if isinstance(types, list) and types else None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "integer" if float(value).is_integer() else "number"
    return {str: "string", list: "array", dict: "object"}[type(value)]


def _types_overlap(a: set[str], b: set[str]) -> bool:
    numeric = {"integer", "number"}
    return bool(a & b) or bool(a & numeric and b & numeric)


def _same(a: Any, b: Any) -> bool:
    """JSON equality (1 == 1.0, but true != 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def _schema_map(value: Any) -> Iterator[tuple[str, Any]]:
    return iter(value.items()) if isinstance(value, dict) else iter(())


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _tool_parameters(pointer: str) -> str:
    """A pointer into StructuredSpec.tool_calls' schema, as the request field it comes from."""
    return _TOOL_ARGUMENTS.sub(lambda match: f"tools[{match.group(1)}].function.parameters", pointer) or "/"
