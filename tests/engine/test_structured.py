"""Structured output on the demo model: the token masks (hand-checked against the vocabulary), the
sampler under a mask, and 100 seeded requests per mode whose every output parses (json_object),
validates (json_schema) or is a well-formed call (tool_choice "any" on v0.3); n > 1, seeds,
preemption, and max_tokens mid-object."""

import asyncio
import dataclasses
import json
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache

import jsonschema
import pytest
import torch
from safetensors.torch import save_file

from mistral_grpc.engine.sampler import Sampler
from mistral_grpc.engine.sampling_params import SamplingParams, StructuredSpec
from mistral_grpc.engine.structured import GrammarCompiler, InvalidSchemaError
from mistral_grpc.model.demo import demo_config, demo_weights
from mistral_grpc.tokenizer import MistralTokenizer
from mistral_grpc.tokenizer.vocab import SHIPPED_DIR
from test_engine import Harness, finish_of, text_of, tokens_of

# Bounded on every side, so random weights finish it well within max_tokens: strings with lengths
# and patterns, an enum, a const, bounded integers and arrays, an optional property, anyOf, nesting.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "member": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                                     "kind": {"const": "home"}},
                    "required": ["zip", "kind"], "additionalProperties": False},
        "nickname": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 3}]},
    },
    "required": ["name", "age", "member", "color", "address"],
    "additionalProperties": False,
}
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Lima"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^UTC[+-][0-9]$"}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = {"get_weather": WEATHER, "get_time": TIME}
REQUESTS = 100


@pytest.fixture(scope="module")
def h() -> Iterator[Harness]:
    harness = Harness(kv_cache_memory=64 * 2**20, max_batch_size=128, max_prefill_tokens=4096)
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def v3(tmp_path_factory) -> Iterator[Harness]:
    """The demo model with v0.3's vocabulary (32768 tokens, tool-call control tokens)."""
    model_dir = tmp_path_factory.mktemp("demo-v3")
    config = dataclasses.replace(demo_config(), vocab_size=32768)
    (model_dir / "config.json").write_text(json.dumps(config.to_dict()))
    save_file(demo_weights(config), model_dir / "model.safetensors", metadata={"format": "pt"})
    shutil.copyfile(SHIPPED_DIR / "mistral_tokenizer_v3.json", model_dir / "tokenizer.json")
    harness = Harness(model=str(model_dir), kv_cache_memory=64 * 2**20, max_batch_size=128, max_prefill_tokens=4096)
    yield harness
    harness.close()


@cache
def tokenizer(version: str) -> MistralTokenizer:
    return MistralTokenizer.from_file(SHIPPED_DIR / f"mistral_tokenizer_{version}.json")


@cache  # one compiler per version, shared by the tests, as an engine shares its own
def grammar_compiler(tok: MistralTokenizer) -> GrammarCompiler:
    return GrammarCompiler(tok)


def allowed(tok: MistralTokenizer, state) -> set[int]:
    mask = grammar_compiler(tok).bitmask([state])[0]
    bits = (mask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return set(bits.flatten().nonzero().flatten().tolist())


def new_state(tok: MistralTokenizer, spec: StructuredSpec):
    [state] = grammar_compiler(tok).new_states(spec, 1)
    return state


def accept_pieces(tok: MistralTokenizer, state, pieces: list[str]) -> None:
    for piece in pieces:
        assert state.accept(tok._vocab.token_id(piece)), piece


# ---- the masks, hand-checked -----------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_an_answer_opens_with_a_brace_or_a_space_and_a_brace(version: str) -> None:
    tok = tokenizer(version)
    state = new_state(tok, StructuredSpec.json_object())
    first = allowed(tok, state)
    # After "{" the layout allows only '"' or '}'; SentencePiece drops the leading space of an answer's
    # first "▁..." token, so " {" is the same answer as "{". The byte token <0x20> keeps its space, so
    # it may not open the answer (the content would start with " "); <0x7B> counts by its byte.
    expected = {b" ", b"{", b" {", b"{}", b" {}", b'{"', b' {"'}
    space_byte = tok._vocab.token_id("<0x20>")
    assert first == {t for t in range(tok.vocab_size) if tok.token_bytes(t) in expected} - {space_byte}
    assert tok._vocab.token_id("<0x7B>") in first
    assert all(not tok.decode([t]).startswith(" ") for t in first)
    assert state.accept(tok._vocab.token_id("▁{"))
    assert space_byte not in allowed(tok, state)  # after "{": no space at all


def test_after_the_tool_calls_token_a_call_array_opens_without_a_kept_space() -> None:
    tok = tokenizer("v3")
    state = new_state(tok, StructuredSpec.tool_calls(list(TOOLS.items())))
    assert state.accept(tok.tool_calls_token_id)
    after = allowed(tok, state)
    assert tok._vocab.token_id("▁[") in after and tok._vocab.token_id("<0x20>") not in after


def test_eos_exactly_when_the_object_is_complete() -> None:
    tok = tokenizer("v1")
    state = new_state(tok, StructuredSpec.json_object())
    for piece in ['{"', "a", '":', "▁", "1"]:
        assert tok.eos_id not in allowed(tok, state)
        accept_pieces(tok, state, [piece])
    assert tok.eos_id not in allowed(tok, state)
    assert state.accept(tok._vocab.token_id("}"))
    assert allowed(tok, state) == {tok.eos_id}


def test_the_layout_is_json_dumps() -> None:
    tok = tokenizer("v1")
    state = new_state(tok, StructuredSpec.json_object())
    accept_pieces(tok, state, ["{", '"', "a", '":'])
    after_colon = {tok.token_bytes(t) for t in allowed(tok, state)}
    assert b" " in after_colon and b":" not in after_colon and b"\n" not in after_colon
    assert all(s.startswith(b" ") for s in after_colon)  # ": " and nothing else


def test_a_bounded_string_never_holds_a_raw_control_character() -> None:
    # xgrammar 0.2.8 would let a tab or 0x1A into a string with maxLength (invalid JSON).
    tok = tokenizer("v1")
    state = new_state(tok, StructuredSpec.json_schema(
        {"type": "object", "properties": {"a": {"type": "string", "maxLength": 4}}, "required": ["a"]}))
    accept_pieces(tok, state, ["{", '"', "a", '":', '▁"', "x"])
    inside = allowed(tok, state)
    assert tok._vocab.token_id("y") in inside and tok._vocab.token_id('"') in inside
    for byte in (0x09, 0x1A, 0x0A, 0x00):
        assert tok._vocab.token_id(f"<0x{byte:02X}>") not in inside


def test_tool_calls_open_with_the_control_token_then_a_call_array() -> None:
    tok = tokenizer("v3")
    state = new_state(tok, StructuredSpec.tool_calls(list(TOOLS.items())))
    assert allowed(tok, state) == {tok.tool_calls_token_id}
    assert state.accept(tok.tool_calls_token_id)
    after = {tok.token_bytes(t) for t in allowed(tok, state)}
    assert b"[" in after and b" [" in after
    assert all(s.removeprefix(b" ").startswith(b"[") or s == b" " for s in after)
    accept_pieces(tok, state, ["▁[", '{"', "name", '":', '▁"', "get"])
    # Only the tools' names may go on: get_weather or get_time, then the closing quote.
    ends = [b'_weather"', b'_time"']
    continuations = {tok.token_bytes(t) for t in allowed(tok, state)}
    assert b"_" in continuations
    assert all(any(end.startswith(s) or s.startswith(end) for end in ends) for s in continuations)


def test_a_compiled_grammar_is_reused_from_the_cache() -> None:
    compiler = GrammarCompiler(tokenizer("v1"))  # its own, so the cache starts empty
    spec = StructuredSpec.json_schema(PERSON)
    assert StructuredSpec.json_schema(dict(reversed(PERSON.items()))) == spec  # key order is not identity
    assert compiler.cache_size_bytes == 0
    first = compiler.compile(spec)
    held = compiler.cache_size_bytes
    assert held >= first.memory_size_bytes > 0  # kept for reuse
    compiler.compile(StructuredSpec.json_schema(dict(reversed(PERSON.items()))))
    assert compiler.cache_size_bytes == held  # found, not compiled again
    compiler.compile(StructuredSpec.json_schema(WEATHER))
    assert compiler.cache_size_bytes > held  # another schema is another entry


def test_the_engine_finds_the_grammar_the_server_compiled(h: Harness) -> None:
    spec = StructuredSpec.json_schema(TIME)
    h.engine.compile_grammar(spec)  # as the servicer does, off the event loop, before generate
    held = h.engine._core.grammars.cache_size_bytes
    assert held > 0
    outputs = h.run(h.collect(h.prompt("The time?"), structured=spec, max_tokens=30, seed=1))
    assert finish_of(outputs) in ("stop", "length")
    assert h.engine._core.grammars.cache_size_bytes == held


def test_schema_errors_name_the_problem() -> None:
    compiler = grammar_compiler(tokenizer("v1"))
    with pytest.raises(InvalidSchemaError, match='Unsupported type "objekt"'):
        compiler.compile(StructuredSpec.json_schema({"type": "objekt"}))
    with pytest.raises(InvalidSchemaError, match="has no tool calls"):
        compiler.compile(StructuredSpec.tool_calls([("f", {})]))


# ---- keywords xgrammar would ignore are refused, with where they are --------------------------

INT = {"type": "integer"}
# (schema, the problem named): each keyword below is one xgrammar 0.2.8 compiles but does not enforce.
UNENFORCEABLE = [
    ({"type": "array", "items": INT, "uniqueItems": True}, "uniqueItems at / is not supported"),
    ({"type": "object", "properties": {"a": {"type": "array", "items": INT, "uniqueItems": True}}},
     "uniqueItems at /properties/a is not supported"),
    ({"type": "array", "items": {"type": "array", "contains": {"const": 5}}}, "contains at /items is not supported"),
    ({"not": {"type": "string"}}, "not at / is not supported"),
    ({"not": {}}, "not at / is not supported"),
    ({"type": "integer", "if": {"minimum": 0}, "then": {"const": 1}}, "if at / is not supported"),
    ({"type": "object", "properties": {"a": INT, "b": INT}, "dependentRequired": {"a": ["b"]}},
     "dependentRequired at / is not supported"),
    ({"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}, "dependentSchemas at / is not supported"),
    ({"$dynamicAnchor": "n", "type": "object", "properties": {"c": {"$dynamicRef": "#n"}}},
     "$dynamicRef at /properties/c is not supported"),
    ({"$defs": {"x": {"type": "array", "uniqueItems": True}}, "$ref": "#/$defs/x"},
     "uniqueItems at /$defs/x is not supported"),
    ({"definitions": {"a/b": {"not": {}}}}, "not at /definitions/a~1b is not supported"),
    ({"anyOf": [INT, {"type": "array", "items": {"oneOf": [{"contains": {}}]}}]},
     "contains at /anyOf/1/items/oneOf/0 is not supported"),
    ({"type": "array", "prefixItems": [{"type": "array", "uniqueItems": True}]},
     "uniqueItems at /prefixItems/0 is not supported"),
    ({"type": "object", "additionalProperties": {"not": INT}}, "not at /additionalProperties is not supported"),
    ({"type": "string", "enum": ["a", 1]}, "enum at / value 1 breaks the schema's other keywords"),
    ({"type": "string", "const": 1}, "const at / value 1 breaks"),
    ({"minimum": 3}, 'minimum at / needs a "type"'),
    ({"type": "array", "items": {"maxLength": 2}}, 'maxLength at /items needs a "type"'),
    ({"type": "number", "multipleOf": 0.5}, "multipleOf at / is supported for type integer only"),
    ({"type": "integer", "multipleOf": 5000}, "multipleOf at / must be a whole number from 1 to 1024"),
    ({"type": "object", "properties": {"a": INT}, "required": ["b"]},
     "required at / names 'b', which is not in properties"),
    ({"type": "object", "properties": {"a": INT}, "anyOf": [{"required": ["a"]}]}, "properties at / beside anyOf"),
    ({"type": "integer", "allOf": [{"type": "integer", "minimum": 3}]}, "type at / beside allOf"),
    ({"allOf": [{"type": "integer", "minimum": 3}, {"type": "integer", "maximum": 5}]},
     "allOf at / with more than one schema is not supported"),
    ({"oneOf": [INT, {"type": "number"}]}, "oneOf at / branches 0 and 1 may both match"),
    ({"oneOf": [{"type": "object", "properties": {"a": INT}}, {"type": "object", "properties": {"b": INT}}]},
     "oneOf at / branches 0 and 1 may both match"),
    ({"$defs": {"x": INT}, "type": "object", "properties": {"a": {"$ref": "#/$defs/x", "minimum": 5}}},
     "minimum at /properties/a beside $ref"),
    ({"$defs": {"x": {"$anchor": "xx", "type": "integer"}}, "properties": {"a": {"$ref": "#xx"}}},
     "$ref at /properties/a is '#xx': only '#' and '#/...' JSON pointers are supported"),
]


@pytest.mark.parametrize("schema, problem", UNENFORCEABLE, ids=[problem for _, problem in UNENFORCEABLE])
def test_a_keyword_xgrammar_would_ignore_is_refused_naming_where(schema, problem: str) -> None:
    with pytest.raises(InvalidSchemaError, match=re.escape(problem)):
        grammar_compiler(tokenizer("v1")).compile(StructuredSpec.json_schema(schema))


def test_every_unenforceable_keyword_is_named_at_once() -> None:
    schema = {"type": "array", "uniqueItems": True, "items": {"not": {}}}
    with pytest.raises(InvalidSchemaError) as caught:
        grammar_compiler(tokenizer("v1")).compile(StructuredSpec.json_schema(schema))
    assert "uniqueItems at / is not supported" in str(caught.value) and "not at /items" in str(caught.value)


def test_a_tool_parameter_schema_is_checked_and_named_by_its_tool() -> None:
    parameters = {"type": "object", "properties": {"xs": {"type": "array", "items": INT, "uniqueItems": True}}}
    spec = StructuredSpec.tool_calls([("get_time", TIME), ("f", parameters)])
    where = "uniqueItems at tools[1].function.parameters/properties/xs"
    with pytest.raises(InvalidSchemaError, match=re.escape(where)):
        grammar_compiler(tokenizer("v3")).compile(spec)


ANNOTATED = {"type": "integer", "title": "t", "description": "d", "examples": [1], "default": 2, "$comment": "c",
             "deprecated": True, "readOnly": True, "writeOnly": False, "nullable": True}
# Keywords xgrammar enforces (or enforces more strictly), each with a bounded schema so a random walk
# through the grammar ends: every finished output must validate.
SUPPORTED = {
    "annotations": {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "https://example.com/s",
                    "type": "object", "properties": {"a": ANNOTATED}, "required": ["a"], "additionalProperties": False},
    "type list": {"type": ["boolean", "null"]},
    "enum const": {"type": "object", "properties": {"e": {"type": "string", "enum": ["a", "b"]},
                                                    "c": {"const": [1, 2]}},
                   "required": ["e", "c"], "additionalProperties": False},
    "integer bounds": {"type": "array", "items": {"type": "integer", "minimum": -5, "exclusiveMaximum": 40,
                                                  "multipleOf": 3}, "maxItems": 4},
    "integer exclusive": {"type": "integer", "exclusiveMinimum": 7, "maximum": 9},
    "number bounds": {"type": "number", "minimum": 0.5, "maximum": 2},
    "strings": {"type": "array", "prefixItems": [{"type": "string", "minLength": 2, "maxLength": 4},
                                                 {"type": "string", "pattern": "^[a-c]{1,3}$"}], "items": False,
                "minItems": 2},
    "arrays": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3, "uniqueItems": False},
    "objects": {"type": "object", "properties": {"p": {"type": "boolean"}}, "patternProperties": {"^q[0-9]$": INT},
                "propertyNames": {"maxLength": 2}, "minProperties": 1, "maxProperties": 2,
                "additionalProperties": False},
    "additionalProperties": {"type": "object", "additionalProperties": {"type": "boolean"}, "maxProperties": 2,
                             "propertyNames": {"pattern": "^[a-z]$"}},
    "anyOf oneOf allOf": {"type": "object", "properties": {
        "any": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 0, "maximum": 3}]},
        "one": {"oneOf": [{"type": "boolean"}, {"const": "x"}]},
        "tagged": {"oneOf": [{"type": "object", "properties": {"k": {"const": "a"}}, "required": ["k"]},
                             {"type": "object", "properties": {"k": {"const": "b"}, "n": INT}, "required": ["k"]}]},
        "all": {"allOf": [{"type": "integer", "minimum": 1, "maximum": 2}]}},
        "required": ["any", "one", "tagged", "all"], "additionalProperties": False},
    "refs": {"$defs": {"small": {"type": "integer", "minimum": 0, "maximum": 9, "description": "d"}},
             "definitions": {"flag": {"type": "boolean"}},
             "type": "object", "properties": {"a": {"$ref": "#/$defs/small", "title": "t"},
                                              "b": {"$ref": "#/definitions/flag"}},
             "required": ["a", "b"], "additionalProperties": False},
}


def random_walk(tok: MistralTokenizer, spec: StructuredSpec, rng: random.Random, steps: int) -> str | None:
    """A random answer the grammar allows (what any model could sample), or None if it did not end."""
    state, ids = new_state(tok, spec), []
    for _ in range(steps):
        choices = sorted(allowed(tok, state))
        if tok.eos_id in choices and (len(choices) == 1 or rng.random() < 0.3):
            return tok.decode(ids)
        token = rng.choice([t for t in choices if t != tok.eos_id])
        assert state.accept(token)
        ids.append(token)
    return None


@pytest.mark.parametrize("name", SUPPORTED)
def test_outputs_under_supported_keywords_validate(name: str) -> None:
    tok, schema = tokenizer("v1"), SUPPORTED[name]
    spec = StructuredSpec.json_schema(schema)
    rng = random.Random(name)
    texts = [text for _ in range(12) if (text := random_walk(tok, spec, rng, 80)) is not None]
    assert len(texts) >= 6, texts  # most walks end within the budget
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)(schema)
    for text in texts:
        assert not text.startswith(" "), text
        validator.validate(json.loads(text))


def test_serving_never_imports_transformers() -> None:
    script = ("import sys\n"
              "from mistral_grpc.engine.structured import GrammarCompiler\n"
              "from mistral_grpc.engine.sampling_params import StructuredSpec\n"
              "from mistral_grpc.tokenizer import MistralTokenizer\n"
              "from mistral_grpc.tokenizer.vocab import SHIPPED_DIR\n"
              "tok = MistralTokenizer.from_file(SHIPPED_DIR / 'mistral_tokenizer_v1.json')\n"
              "GrammarCompiler(tok).new_states(StructuredSpec.json_object(), 1)\n"
              "assert 'transformers' not in sys.modules, 'transformers was imported'\n")
    subprocess.run([sys.executable, "-c", script], check=True)


# ---- the sampler under a mask --------------------------------------------------------------


@dataclasses.dataclass
class Row:
    params: SamplingParams
    seed: int = 7
    token_ids: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 3])
    prompt_len: int = 3


def test_the_sampler_draws_only_allowed_tokens_and_reports_unmasked_logprobs() -> None:
    vocab = 100
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0)) * 3
    allowed_ids = [5, 17, 40, 99]
    mask = torch.zeros(4, 4, dtype=torch.int32)
    for t in allowed_ids:
        mask[:, t // 32] |= 1 << (t % 32)
    mask[3] = -1  # a row without a grammar
    json_mode = StructuredSpec.json_object()
    rows = [Row(SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2, structured=json_mode)),
            Row(SamplingParams(temperature=1.5, logprobs=True, structured=json_mode)),
            Row(SamplingParams(temperature=1.0, top_k=2, top_p=0.5, structured=json_mode)),
            Row(SamplingParams(temperature=0.0))]
    out = Sampler(vocab).sample(logits.clone(), rows, mask)  # the mask is applied in place
    assert out.tokens[0] == max(allowed_ids, key=lambda t: logits[0, t])  # greedy: the best allowed token
    assert out.tokens[1] in allowed_ids and out.tokens[2] in allowed_ids
    assert out.tokens[3] == int(logits[3].argmax())
    reference = torch.log_softmax(logits, dim=-1)
    for row in (0, 1):
        assert out.logprobs[row] == pytest.approx(float(reference[row, out.tokens[row]]), abs=1e-5)
    assert [t for t, _ in out.top[0]] == reference[0].topk(2).indices.tolist()  # the model's, masked or not
    many = [Row(SamplingParams(temperature=2.0, structured=json_mode), seed=seed) for seed in range(500)]
    drawn = Sampler(vocab).sample(logits[1:2].repeat(500, 1), many, mask[1:2].repeat(500, 1)).tokens
    assert set(drawn) == set(allowed_ids)  # every allowed token drawn at some seed, never a masked one


# ---- 100 seeded requests per mode on the demo engine -----------------------------------------


async def generate_many(harness: Harness, spec: StructuredSpec, count: int, **params):
    prompt = harness.prompt("Answer in JSON, please.")
    return await asyncio.gather(*(harness.collect(prompt, seed=seed, structured=spec, **params)
                                  for seed in range(count)))


def test_json_schema_outputs_all_validate(h: Harness) -> None:
    results = h.run(generate_many(h, StructuredSpec.json_schema(PERSON), REQUESTS, max_tokens=256))
    for outputs in results:
        assert finish_of(outputs) == "stop"
        jsonschema.validate(json.loads(text_of(outputs)), PERSON)
    assert len({text_of(o) for o in results}) > REQUESTS // 2  # seeds make different answers
    assert h.engine.kv_blocks_used() == 0


@pytest.fixture
def closing_model(h: Harness, monkeypatch) -> None:
    """Random weights almost never close a string; this stands in for a model that has learned JSON by
    favouring the tokens that close something. The grammar alone still decides what is allowed."""
    core = h.engine._core
    bias = torch.zeros(core.tokenizer.vocab_size)
    for token in range(core.tokenizer.vocab_size):
        surface = core.tokenizer.token_bytes(token)
        bias[token] = 6.0 if b'"' in surface else 3.0 if b"}" in surface or b"]" in surface else 0.0
    run = core.runner.run
    monkeypatch.setattr(core.runner, "run", lambda chunks: run(chunks) + bias)


def test_json_object_outputs_all_parse_as_objects(h: Harness, closing_model) -> None:
    results = h.run(generate_many(h, StructuredSpec.json_object(), REQUESTS, max_tokens=256))
    for outputs in results:
        assert finish_of(outputs) == "stop"
        assert isinstance(json.loads(text_of(outputs)), dict)
    assert len({text_of(o) for o in results}) > REQUESTS // 2


def test_tool_calls_are_all_well_formed(v3: Harness) -> None:
    spec = StructuredSpec.tool_calls(list(TOOLS.items()))
    # Random weights end the array or add a call about evenly: 512 tokens hold ~15 calls.
    results = v3.run(generate_many(v3, spec, REQUESTS, max_tokens=512))
    for outputs in results:
        [last] = [d for o in outputs for d in o.deltas if d.finish_reason]
        assert last.finish_reason == "tool_calls" and text_of(outputs) == ""
        assert tokens_of(outputs)[0] == v3.engine.tokenizer.tool_calls_token_id
        for call in last.tool_calls:
            jsonschema.validate(json.loads(call.arguments), TOOLS[call.name])
    assert {call.name for o in results for d in o[-1].deltas for call in d.tool_calls} == set(TOOLS)


# ---- n > 1, seeds, preemption, budgets -------------------------------------------------------


def test_n_choices_each_follow_the_schema_and_a_seed_repeats_them(h: Harness) -> None:
    spec = StructuredSpec.json_schema(PERSON)
    prompt = h.prompt("Three people, please.")
    first = h.run(h.collect(prompt, n=3, seed=11, temperature=1.0, structured=spec, max_tokens=256))
    texts = [text_of(first, i) for i in range(3)]
    for i, text in enumerate(texts):
        assert finish_of(first, i) == "stop"
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(texts)) == 3

    async def crowded():
        noise = [h.collect(h.prompt(f"noise {i}"), max_tokens=30, structured=StructuredSpec.json_object())
                 for i in range(4)]
        results = await asyncio.gather(h.collect(prompt, n=3, seed=11, structured=spec, max_tokens=256), *noise)
        return results[0]

    again = h.run(crowded())
    assert [text_of(again, i) for i in range(3)] == texts


def test_greedy_json_is_deterministic_and_valid(h: Harness) -> None:
    spec = StructuredSpec.json_schema(PERSON)
    prompt = h.prompt("greedy")
    one, two = (h.run(h.collect(prompt, temperature=0.0, structured=spec, max_tokens=256)) for _ in range(2))
    assert tokens_of(one) == tokens_of(two)
    jsonschema.validate(json.loads(text_of(one)), PERSON)


def test_max_tokens_mid_object_ends_with_length(h: Harness) -> None:
    # PERSON's required properties alone take more than 12 tokens.
    outputs = h.run(h.collect(h.prompt("long"), seed=3, structured=StructuredSpec.json_schema(PERSON), max_tokens=12))
    assert finish_of(outputs) == "length" and len(tokens_of(outputs)) == 12
    text = text_of(outputs)
    assert text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_preempted_choices_keep_their_grammar() -> None:
    block_bytes = 2 * 4 * 16 * 2 * 32 * 4  # k and v, 4 layers, 16 tokens, 2 KV heads, head_dim 32, fp32
    small = Harness(kv_cache_memory=16 * block_bytes, max_batch_size=8, max_prefill_tokens=64)
    try:
        spec = StructuredSpec.json_schema(PERSON)
        prompts = [small.prompt(f"preempt me {i} " + "pad " * 20) for i in range(4)]
        alone = [tokens_of(small.run(small.collect(p, temperature=0.0, structured=spec, max_tokens=60)))
                 for p in prompts]

        async def together():
            return await asyncio.gather(*(small.collect(p, temperature=0.0, structured=spec, max_tokens=60)
                                          for p in prompts))

        results = small.run(together())
        assert small.engine._core.scheduler.num_preemptions > 0
        assert [tokens_of(o) for o in results] == alone
        for outputs in results:
            if finish_of(outputs) == "stop":
                jsonschema.validate(json.loads(text_of(outputs)), PERSON)
        assert small.engine.kv_blocks_used() == 0
    finally:
        small.close()


def test_a_schema_the_engine_cannot_compile_fails_that_request_only(h: Harness) -> None:
    bad = StructuredSpec.json_schema({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})
    with pytest.raises(InvalidSchemaError, match="nowhere"):
        h.run(h.collect(h.prompt("bad"), structured=bad, max_tokens=5))
    assert finish_of(h.run(h.collect(h.prompt("fine"), max_tokens=3))) == "length"
