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

xgrammar silently ignores part of JSON Schema, so every schema is first checked by
json_schema_support.unenforceable, which names what would be ignored.

The engine owns one GrammarCompiler (and so one cache of compiled grammars) per tokenizer; the server
reaches it through LLMEngine.compile_grammar. xgrammar is loaded when the first grammar is needed, so
an engine that never sees structured output (and a machine without xgrammar) does without it.
"""

import importlib
import logging
import re
import sys
import threading
import types
from collections.abc import Sequence
from functools import cache, lru_cache
from typing import Any

import torch

from mistral_grpc.engine.json_schema_support import unenforceable
from mistral_grpc.engine.sampling_params import StructuredSpec
from mistral_grpc.tokenizer import MistralTokenizer

log = logging.getLogger(__name__)

CACHE_BYTES = 256 * 2**20  # compiled grammars kept for reuse; the least recently used go first
_XGRAMMAR_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[12:00:00] /project/cpp/x.cc:42: " before a message
_BOUNDED_STRING_CHARACTER = r'[^\"\\\r\n]'
_JSON_STRING_CHARACTER = r'[^\0-\x1f\"\\]'
_TOOL_ARGUMENTS = re.compile(r"^/items/anyOf/(\d+)/properties/arguments")  # StructuredSpec.tool_calls' layout


@cache
def xgrammar() -> types.ModuleType:
    """xgrammar, loaded once. It imports transformers at import time, only for its Hugging Face helpers,
    which this server never calls (the vocabulary comes from our tokenizer): a stand-in takes
    transformers' place while xgrammar loads, so serving does not pay transformers' import."""
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


class InvalidSchemaError(ValueError):
    """The constraint cannot be compiled into a grammar; the message says why, for the caller."""


class GrammarState:
    """One choice's progress through its grammar. Advanced once per generated token: a preempted
    choice recomputes its KV cache but keeps its tokens, so its state stays valid. Draft tokens
    (speculative decoding) advance it only while their masks are filled, then are rolled back."""

    def __init__(self, grammar: Any, forced: Sequence[int] = ()) -> None:  # grammar: xgrammar.CompiledGrammar
        self.matcher = xgrammar().GrammarMatcher(grammar)
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


class _CompilerParts:
    """xgrammar's compiler for one vocabulary and the first-step mask, built on first use."""

    def __init__(self, tokenizer: MistralTokenizer) -> None:
        xgr = xgrammar()
        surfaces = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        info = xgr.TokenizerInfo(surfaces, xgr.VocabType.RAW, vocab_size=tokenizer.vocab_size,
                                 stop_token_ids=[tokenizer.eos_id])
        self.compiler = xgr.GrammarCompiler(info, cache_limit_bytes=CACHE_BYTES)
        # The grammar's optional leading space is there for the tokens whose space the detokenizer
        # drops at the start of an answer ("▁{" -> "{"); a token that keeps it (<0x20>) would make
        # the content start with " ", so those are masked at an answer's first step.
        self.first_step = xgr.allocate_token_bitmask(1, tokenizer.vocab_size)[0]
        for token, surface in enumerate(surfaces):
            if surface.startswith(b" ") and tokenizer.decode([token]).startswith(" "):
                self.first_step[token // 32] &= ~_bit(token)


class GrammarCompiler:
    """Compiles StructuredSpecs for one tokenizer; a spec compiled before comes from the cache. Safe to
    call from the server's threads and the engine's worker at once."""

    def __init__(self, tokenizer: MistralTokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.eos_id = tokenizer.eos_id
        self.tool_calls_token_id = tokenizer.tool_calls_token_id
        self._built: _CompilerParts | None = None
        self._build_lock = threading.Lock()

    @property
    def _parts(self) -> _CompilerParts:
        with self._build_lock:
            if self._built is None:
                self._built = _CompilerParts(self.tokenizer)
            return self._built

    @property
    def cache_size_bytes(self) -> int:
        """The bytes of compiled grammars held for reuse (0 before the first compile)."""
        return self._built.compiler.get_cache_size_bytes() if self._built is not None else 0

    def compile(self, spec: StructuredSpec) -> Any:  # an xgrammar.CompiledGrammar
        """Raises InvalidSchemaError naming what xgrammar cannot turn into a grammar. The schema is
        taken to be valid JSON Schema (the server checks that first, with the field to blame)."""
        if spec.kind == "tool_calls" and self.tool_calls_token_id is None:
            raise InvalidSchemaError("this model's chat format (v1) has no tool calls")
        if problems := unenforceable(spec.schema):
            where = _tool_parameters if spec.kind == "tool_calls" else lambda pointer: pointer or "/"
            raise InvalidSchemaError("cannot enforce this schema: " + "; ".join(
                f"{keyword} at {where(pointer)} {why}" for keyword, pointer, why in problems))
        return self._parts.compiler.compile_grammar(grammar_text(spec.schema))

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
        mask = xgrammar().allocate_token_bitmask(sum(1 + len(d) for d in drafts), self.vocab_size)
        first_row = 0
        for state, state_drafts in zip(states, drafts, strict=True):
            # One row at a time: xgrammar's threaded batch fill costs more than it saves on the few
            # cores a CPU server shares with the model.
            if state is not None:
                state.fill_masks(mask, first_row, state_drafts, self.eos_id, self._parts.first_step)
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
    xgr = xgrammar()
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


def _tool_parameters(pointer: str) -> str:
    """A pointer into StructuredSpec.tool_calls' schema, as the request field it comes from."""
    return _TOOL_ARGUMENTS.sub(lambda match: f"tools[{match.group(1)}].function.parameters", pointer) or "/"
