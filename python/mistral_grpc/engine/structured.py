"""Structured output: grammars compiled against the tokenizer's vocabulary, one matcher per choice, and
the batch's token bitmask that the sampler applies before drawing (ops.apply_token_bitmask).

xgrammar does the grammar work. Its vocabulary is built from our own tokenizer: each token's surface
bytes exactly as the detokenizer emits them (SentencePiece's ▁ as a space, <0xNN> as one byte) and
b"" for control tokens, which xgrammar then never allows; the stop token is EOS. The grammar is
` `? then the JSON: SentencePiece drops the leading space of an answer's first token, so " {" may open
the answer just as "{" may. The JSON is laid out as json.dumps does (", " and ": ", no other
whitespace), which is how Mistral's tool calls are written, and leaves a model no blank space to loop
on. A choice that reaches max_tokens mid-object ends with "length" and partial JSON.
"""

import importlib
import logging
import re
import sys
import types
from collections.abc import Sequence
from functools import cache, lru_cache

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
    """One choice's progress through its grammar. Advanced once per generated token, never rewound:
    a preempted choice recomputes its KV cache but keeps its tokens, so its state stays valid."""

    def __init__(self, grammar: "xgr.CompiledGrammar", forced: Sequence[int] = ()) -> None:
        self.matcher = xgr.GrammarMatcher(grammar)
        self._forced = list(forced)  # control tokens the output must open with, before the grammar's text

    @property
    def forced_token(self) -> int | None:
        return self._forced[0] if self._forced else None

    def accept(self, token: int) -> bool:
        """Feeds a generated token (never EOS: it ends the choice); False if the grammar forbids it."""
        if self._forced:
            return token == self._forced.pop(0)
        return self.matcher.accept_token(token)


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

    def compile(self, spec: StructuredSpec) -> "xgr.CompiledGrammar":
        """Raises InvalidSchemaError naming what xgrammar cannot turn into a grammar. The schema is
        taken to be valid JSON Schema (the server checks that first, with the field to blame)."""
        if spec.kind == "tool_calls" and self.tool_calls_token_id is None:
            raise InvalidSchemaError("this model's chat format (v1) has no tool calls")
        return self._compiler.compile_grammar(grammar_text(spec.schema))

    def new_states(self, spec: StructuredSpec, n: int) -> list[GrammarState]:
        """One state per choice of a request (compiled once)."""
        grammar = self.compile(spec)
        forced = [self.tool_calls_token_id] if spec.kind == "tool_calls" else []
        return [GrammarState(grammar, forced) for _ in range(n)]

    def bitmask(self, states: Sequence[GrammarState | None]) -> torch.Tensor | None:
        """int32 [len(states), ceil(V / 32)] on the CPU: each constrained row's allowed next tokens,
        all ones for a row without a grammar; None when no row has one."""
        if all(state is None for state in states):
            return None
        mask = xgr.allocate_token_bitmask(len(states), self.vocab_size)
        for i, state in enumerate(states):
            if state is not None and state.forced_token is not None:
                _allow_only(mask[i], state.forced_token)
            elif state is not None:
                # One row at a time: xgrammar's threaded batch fill costs more than it saves on the
                # few cores a CPU server shares with the model.
                state.matcher.fill_next_token_bitmask(mask, i)
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


def _allow_only(row: torch.Tensor, token: int) -> None:
    row.zero_()
    bit = 1 << (token % 32)
    row[token // 32] = bit - 2**32 if bit >= 2**31 else bit  # the same bit pattern as an int32


@cache
def grammar_compiler(tokenizer: MistralTokenizer) -> GrammarCompiler:
    """The compiler (and so the cache) of one tokenizer, shared by the server, which compiles each
    request's grammar off the event loop, and the engine, which then finds it compiled."""
    return GrammarCompiler(tokenizer)
