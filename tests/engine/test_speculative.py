"""Speculative decoding changes no result: with a prediction that is right, half right or unrelated,
and with prompt lookup, every token and logprob equals a run without speculation, bit for bit, on
the demo model in float32 and bfloat16; drafts are counted as the test expects, and every KV block
is free afterwards."""

import asyncio
from collections.abc import Iterator

import pytest
import torch

from mistral_grpc.engine.block_manager import BlockManager, BlockTable
from mistral_grpc.engine.request import GenerationOutput, GenerationRequest
from mistral_grpc.engine.sampling_params import SamplingParams, StructuredSpec
from mistral_grpc.engine.speculative import Drafter, NgramIndex, SpeculativeConfig, prediction_index
from mistral_grpc.metrics import REGISTRY
from mistral_grpc.engine.structured import GrammarCompiler
from test_engine import Harness
from test_structured import TOOLS, allowed, new_state, tokenizer

K = 8
SEEDED = dict(temperature=0.9, top_p=0.9, top_k=40, seed=5)
PENALISED = dict(temperature=0.8, seed=9, presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.3)


class Pair:
    """The same demo model twice: without speculation (the reference) and with it."""

    def __init__(self, dtype: str) -> None:
        args = dict(dtype=dtype, kv_cache_memory=32 * 2**20, max_batch_size=16, max_prefill_tokens=64)
        self.plain = Harness(speculative_tokens=0, **args)
        self.spec = Harness(speculative_tokens=K, prompt_lookup=True, **args)  # on whatever the dtype's default
        self._ids = iter(range(10**9))

    def prompt(self, text: str) -> list[int]:
        return self.plain.prompt(text)

    async def collect(self, harness: Harness, prompt: list[int], prediction=None, **params) -> list[GenerationOutput]:
        request = GenerationRequest(f"s{next(self._ids)}", prompt, SamplingParams(**params),
                                    prediction=None if prediction is None else tuple(prediction))
        return [out async for out in harness.engine.generate(request)]

    def both(self, prompt: list[int], prediction=None,
             **params) -> tuple[list[GenerationOutput], list[GenerationOutput]]:
        plain = self.plain.run(self.collect(self.plain, prompt, **params))
        spec = self.spec.run(self.collect(self.spec, prompt, prediction, **params))
        return plain, spec

    def close(self) -> None:
        self.plain.close()
        self.spec.close()


def trace(outputs: list[GenerationOutput], index: int = 0) -> list[tuple[int, float, list]]:
    """Each token with its logprob and top logprobs, bit for bit."""
    return [(t, lp.logprob, [(top.token, top.logprob) for top in lp.top_logprobs])
            for o in outputs for d in o.deltas if d.index == index
            for t, lp in zip(d.token_ids, d.logprobs, strict=True)]


def tokens(outputs: list[GenerationOutput], index: int = 0) -> list[int]:
    return [t for o in outputs for d in o.deltas if d.index == index for t in d.token_ids]


def text(outputs: list[GenerationOutput], index: int = 0) -> str:
    return "".join(d.text for o in outputs for d in o.deltas if d.index == index)


def finish(outputs: list[GenerationOutput], index: int = 0) -> str | None:
    return [d.finish_reason for o in outputs for d in o.deltas if d.index == index][-1]


def accepted_of_a_prediction(num_right: int, num_tokens: int) -> tuple[int, int]:
    """(accepted, rejected) drafts of a prediction whose first num_right tokens are right, up to its
    first wrong draft, for a reply of num_tokens: the prefill makes the first token, then each step
    verifies K drafts (never past the budget) and makes the accepted ones and one token more."""
    made, accepted = 1, 0
    while made < num_tokens:
        k = min(K, num_tokens - made - 1)
        right = min(k, max(0, num_right - made))
        accepted += right
        made += right + 1
        if right < k:
            return accepted, k - right
    return accepted, 0


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def pair(request) -> Iterator[Pair]:
    p = Pair(request.param)
    yield p
    p.close()


@pytest.fixture(autouse=True)
def no_block_left(request):
    yield
    if "pair" in request.fixturenames:
        p = request.getfixturevalue("pair")
        assert p.spec.engine.kv_blocks_used() == 0 and p.plain.engine.kv_blocks_used() == 0


@pytest.mark.parametrize("params", [dict(temperature=0.0), SEEDED, PENALISED], ids=["greedy", "seeded", "penalties"])
def test_a_right_prediction_is_accepted_whole_and_changes_nothing(pair: Pair, params: dict) -> None:
    prompt = pair.prompt("Repeat after me")
    plain, _ = pair.both(prompt, max_tokens=40, logprobs=True, top_logprobs=3, **params)
    predicted = tokens(plain)
    assert len(predicted) == 40
    _, spec = pair.both(prompt, predicted, max_tokens=40, logprobs=True, top_logprobs=3, **params)
    assert trace(spec) == trace(plain)
    assert text(spec) == text(plain) and finish(spec) == finish(plain) == "length"
    counts = (spec[-1].accepted_prediction_tokens, spec[-1].rejected_prediction_tokens)
    assert counts == accepted_of_a_prediction(40, 40) == (34, 0)
    assert len(spec) == 1 + -(-39 // (K + 1))  # the prefill's token, then K + 1 tokens a step


@pytest.mark.parametrize("params", [dict(temperature=0.0), SEEDED, PENALISED], ids=["greedy", "seeded", "penalties"])
def test_a_half_right_or_unrelated_prediction_changes_nothing(pair: Pair, params: dict) -> None:
    prompt = pair.prompt("Edit this text")
    plain, _ = pair.both(prompt, max_tokens=48, logprobs=True, **params)
    right = tokens(plain)
    unrelated = [1000 + i for i in range(48)]
    half = right[:24] + unrelated[:24]
    _, spec_half = pair.both(prompt, half, max_tokens=48, logprobs=True, **params)
    _, spec_unrelated = pair.both(prompt, unrelated, max_tokens=48, logprobs=True, **params)
    assert trace(spec_half) == trace(plain)
    assert trace(spec_unrelated) == trace(plain)
    # Past the first wrong draft prompt lookup may draft too (the prediction has nothing more to offer).
    accepted, rejected = accepted_of_a_prediction(24, 48)
    assert spec_half[-1].accepted_prediction_tokens >= accepted and spec_half[-1].rejected_prediction_tokens >= rejected
    assert spec_unrelated[-1].accepted_prediction_tokens == 0


def test_a_prediction_with_an_insertion_is_realigned(pair: Pair) -> None:
    """The reply departs from the prediction (the prediction lacks 3 of its tokens) and picks it up
    again: drafting resumes after the gap."""
    prompt = pair.prompt("Insert something")
    plain, _ = pair.both(prompt, max_tokens=40, temperature=0.0, logprobs=True)
    right = tokens(plain)
    gapped = right[:12] + right[15:]
    _, spec = pair.both(prompt, gapped, max_tokens=40, temperature=0.0, logprobs=True)
    assert trace(spec) == trace(plain)
    # Without re-alignment only the 11 drafts before the gap could be right.
    assert spec[-1].accepted_prediction_tokens > 20


def test_prompt_lookup_changes_nothing_and_drafts_from_repeats(pair: Pair) -> None:
    """A greedy random model falls into loops: prompt lookup then drafts from the reply itself."""
    prompt = pair.prompt("say it again " * 8)
    plain, spec = pair.both(prompt, max_tokens=160, temperature=0.0, logprobs=True)
    assert trace(spec) == trace(plain)
    assert spec[-1].accepted_prediction_tokens + spec[-1].rejected_prediction_tokens > 0
    seeded_plain, seeded_spec = pair.both(prompt, max_tokens=160, logprobs=True, **SEEDED)
    assert trace(seeded_spec) == trace(seeded_plain)


def test_a_stop_string_inside_accepted_drafts_cuts_there(pair: Pair) -> None:
    prompt = pair.prompt("Stop somewhere")
    full, _ = pair.both(prompt, max_tokens=40, temperature=0.0)
    reply = text(full)
    stop = reply[len(reply) // 2:len(reply) // 2 + 3]
    assert stop.strip(), f"the reply is too short to cut: {reply!r}"
    plain, spec = pair.both(prompt, tokens(full), max_tokens=40, temperature=0.0, stop=[stop], logprobs=True)
    assert text(spec) == text(plain) == reply[:reply.find(stop)]
    assert trace(spec) == trace(plain) and finish(spec) == "stop"


def test_max_tokens_is_never_exceeded(pair: Pair) -> None:
    prompt = pair.prompt("Short")
    full, _ = pair.both(prompt, max_tokens=30, temperature=0.0)
    for budget in (1, 2, 3, 9, 10, 11):
        plain, spec = pair.both(prompt, tokens(full), max_tokens=budget, temperature=0.0, logprobs=True)
        assert trace(spec) == trace(plain) and len(tokens(spec)) == budget
        assert spec[-1].completion_tokens == budget


@pytest.mark.parametrize("params", [dict(temperature=0.0), SEEDED], ids=["greedy", "seeded"])
def test_json_schema_drafts_go_through_the_grammar_and_change_nothing(pair: Pair, params: dict) -> None:
    """Each draft row gets the mask of the grammar advanced through the drafts before it; the matcher
    is rolled back after, and a wrong draft leaves it where the accepted tokens put it."""
    structured = StructuredSpec.json_schema({"type": "object", "properties": {"a": {"type": "integer"},
                                                                             "b": {"type": "string"}},
                                             "required": ["a", "b"]})
    prompt = pair.prompt("JSON please")
    plain, _ = pair.both(prompt, max_tokens=40, structured=structured, logprobs=True, **params)
    right = tokens(plain)
    for prediction in (right, right[:len(right) // 2] + [1000] * 8, [1000] * 8):
        _, spec = pair.both(prompt, prediction, max_tokens=40, structured=structured, logprobs=True, **params)
        assert trace(spec) == trace(plain) and text(spec) == text(plain)
    _, spec = pair.both(prompt, right, max_tokens=40, structured=structured, logprobs=True, **params)
    assert spec[-1].accepted_prediction_tokens > 0 and spec[-1].rejected_prediction_tokens == 0


def test_n_choices_each_draft_on_their_own_alongside_other_traffic(pair: Pair) -> None:
    prompt = pair.prompt("Three ways")
    plain = pair.plain.run(pair.collect(pair.plain, prompt, n=3, max_tokens=32, logprobs=True, **SEEDED))
    others = [pair.prompt(f"other traffic {i}") for i in range(4)]
    plain_others = [pair.plain.run(pair.collect(pair.plain, p, max_tokens=24, temperature=0.0)) for p in others]

    async def crowded():
        return await asyncio.gather(
            pair.collect(pair.spec, others[0], max_tokens=24, temperature=0.0),
            pair.collect(pair.spec, prompt, tokens(plain, 1), n=3, max_tokens=32, logprobs=True, **SEEDED),
            *(pair.collect(pair.spec, p, tokens(o), max_tokens=24, temperature=0.0)
              for p, o in zip(others[1:], plain_others[1:])))

    first, spec, *rest = pair.spec.run(crowded())
    for index in range(3):
        assert trace(spec, index) == trace(plain, index)
    assert spec[-1].accepted_prediction_tokens > 0  # choice 1's own reply was the prediction
    assert [tokens(o) for o in [first, *rest]] == [tokens(o) for o in plain_others]


def test_cancelling_mid_verification_frees_every_block(pair: Pair) -> None:
    prompt = pair.prompt("Cancel me")
    full, _ = pair.both(prompt, max_tokens=64, temperature=0.0)

    async def cancel_after_first_step() -> None:
        request = GenerationRequest("cancelled", prompt, SamplingParams(temperature=0.0, max_tokens=64),
                                    prediction=tuple(tokens(full)))
        stream = pair.spec.engine.generate(request)
        await anext(stream)
        await anext(stream)  # a verification step's output
        await stream.aclose()
        for _ in range(100):
            if pair.spec.engine.kv_blocks_used() == 0:
                return
            await asyncio.sleep(0.01)

    pair.spec.run(cancel_after_first_step())
    assert pair.spec.engine.kv_blocks_used() == 0


def test_the_draft_metrics_count_drafts_and_accepted_ones(pair: Pair) -> None:
    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    prompt = pair.prompt("Metered")
    full, _ = pair.both(prompt, max_tokens=20, temperature=0.0)
    drafted = sample("mistral_grpc_spec_draft_tokens_total")
    accepted = sample("mistral_grpc_spec_accepted_tokens_total")
    _, spec = pair.both(prompt, tokens(full)[:10] + [1000] * 10, max_tokens=20, temperature=0.0)
    usage = spec[-1]
    assert sample("mistral_grpc_spec_accepted_tokens_total") - accepted == usage.accepted_prediction_tokens > 0
    assert (sample("mistral_grpc_spec_draft_tokens_total") - drafted
            == usage.accepted_prediction_tokens + usage.rejected_prediction_tokens)


def test_preemption_with_drafts_changes_no_seeded_result() -> None:
    block_bytes = 2 * 4 * 16 * 2 * 32 * 4  # k and v, 4 layers, 16 tokens, 2 KV heads, head_dim 32, fp32
    args = dict(kv_cache_memory=24 * block_bytes, max_batch_size=8, max_prefill_tokens=64)
    plain, spec = Harness(speculative_tokens=0, **args), Harness(speculative_tokens=K, prompt_lookup=True, **args)
    try:
        prompts = [plain.prompt(f"preempt me {i} " + "pad " * 20) for i in range(6)]
        params = [dict(temperature=0.9, seed=i, max_tokens=100, logprobs=True) for i in range(6)]
        alone = [trace(plain.run(plain.collect(p, **k))) for p, k in zip(prompts, params)]

        async def together():
            requests = [GenerationRequest(f"p{i}", p, SamplingParams(**k), prediction=tuple(t for t, _, _ in a))
                        for i, (p, k, a) in enumerate(zip(prompts, params, alone))]

            async def run(request):
                return [out async for out in spec.engine.generate(request)]
            return await asyncio.gather(*(run(r) for r in requests))

        assert [trace(o) for o in spec.run(together())] == alone
        assert spec.engine._core.scheduler.num_preemptions > 0
        assert spec.engine.kv_blocks_used() == 0
    finally:
        plain.close()
        spec.close()


# ---- the drafter alone ---------------------------------------------------------------------------

CONFIG = SpeculativeConfig(max_drafts=4, prompt_lookup=True, max_rows=16)


def test_ngram_index_finds_the_latest_continuation_of_the_longest_suffix() -> None:
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3]
    latest, every = NgramIndex((3, 2)), NgramIndex((3, 2), every=True)
    latest.extend(tokens[:5])
    latest.extend(tokens[5:])  # grown in two parts, as a reply grows
    every.extend(tokens)
    for index in (latest, every):
        assert index.find([8, 2, 3]) == 7  # "2 3" last continued by 7 (the 3-gram "8 2 3" never occurs)
        assert index.find([1, 2, 3]) == 7
        assert index.find([4, 4]) is None
    assert every.find([1, 2, 3], after=0) == 3  # the first at or past 0
    assert every.find([1, 2, 3], after=4) == 7
    assert every.find([1, 2, 3], after=8) == 7  # none past 8: the most recent


def test_the_drafter_follows_the_prediction_and_realigns_after_an_edit() -> None:
    prediction = [10, 11, 12, 13, 14, 15, 16, 17]
    drafter = Drafter(CONFIG, prediction_index(prediction))
    prompt = [1, 2]
    assert drafter.propose(prompt + [10], 2, 8) == [11, 12, 13, 14]
    assert drafter.propose(prompt + [10, 11, 99], 2, 8) == []  # 99 is nowhere in the prediction
    assert drafter.propose(prompt + [10, 11, 99, 13], 2, 8) == [14, 15, 16, 17]
    assert drafter.propose(prompt + [10, 11, 99, 13, 14, 15], 2, 2) == [16, 17]


def test_k_adapts_to_acceptance_and_pauses_after_misses() -> None:
    drafter = Drafter(CONFIG, None)
    drafter.record(4, 1)
    assert drafter.k == 1
    drafter.record(1, 1)
    assert drafter.k == 2
    for _ in range(3):
        drafter.record(2, 0)
    tokens_ = [5, 6, 7, 5, 6]
    assert drafter.propose(tokens_, 0, 4) == []  # paused for a step
    assert drafter.propose(tokens_, 0, 4) == [7]  # K fell to 1


def test_trim_returns_the_blocks_past_the_kept_tokens_and_leaves_the_prefix_cache() -> None:
    blocks = BlockManager(num_blocks=8, block_size=4)
    table = BlockTable()
    prompt = list(range(8))
    blocks.allocate(table, prompt)
    blocks.register_full_blocks(table, prompt, 8)
    blocks.append_slots(table, 8 + 1 + 8)  # a decode and 8 drafts: 3 more blocks
    assert blocks.num_used_blocks == 5
    blocks.trim(table, 8 + 2)  # one draft accepted: 10 tokens, 3 blocks
    assert len(table.block_ids) == 3 and blocks.num_used_blocks == 3
    blocks.free(table)
    other = BlockTable()
    assert blocks.allocate(other, prompt + [99]) == 8  # the prompt's blocks are still cached


def test_speculation_is_off_where_a_rows_result_depends_on_the_batch() -> None:
    """float16 on CPU runs on torch's kernels, whose rounding of a row changes with the batch's size
    (as cuBLAS's on CUDA): drafts would change results there, so none are made."""
    harness = Harness(dtype="float16", speculative_tokens=K, kv_cache_memory=8 * 2**20)
    try:
        assert not harness.engine._core.speculative.enabled
        outputs = harness.run(harness.collect(harness.prompt("half precision"), max_tokens=24, temperature=0.0))
        assert sum(len(o.deltas[0].token_ids) for o in outputs) == 24 and len(outputs) == 24
        assert outputs[-1].accepted_prediction_tokens == outputs[-1].rejected_prediction_tokens == 0
    finally:
        harness.close()


@pytest.mark.parametrize("kind", ["json_object", "tool_calls"])
def test_draft_rows_get_the_masks_of_one_token_at_a_time_and_the_state_is_rewound(kind: str) -> None:
    """Row j's mask is the one a state that accepted drafts[:j] fills, the forced [TOOL_CALLS] token
    included; past a draft the grammar forbids, rows allow everything; the state is as it was after."""
    tok = tokenizer("v3")
    spec_ = StructuredSpec.json_object() if kind == "json_object" else StructuredSpec.tool_calls(list(TOOLS.items()))
    compiler = GrammarCompiler(tok)
    walker = new_state(tok, spec_)
    drafts = []
    for _ in range(10):  # a path the grammar allows: the smallest allowed token at each step
        token = min(allowed(tok, walker) - {tok.eos_id})
        assert walker.accept(token)
        drafts.append(token)

    def one_at_a_time(prefix: list[int]) -> torch.Tensor:
        state = new_state(tok, spec_)
        for token in prefix:
            assert state.accept(token)
        return compiler.bitmask([state])[0]

    state = new_state(tok, spec_)
    before = compiler.bitmask([state])[0]
    masks = compiler.bitmask([state], [drafts])
    for j in range(len(drafts) + 1):
        assert torch.equal(masks[j], one_at_a_time(drafts[:j])), f"row {j}"
    wrong = drafts[:4] + [next(t for t in range(100, tok.vocab_size)
                               if not (int(masks[4][t // 32]) >> (t % 32)) & 1)] + drafts[5:]
    masks = compiler.bitmask([state], [wrong])
    for j in range(5):
        assert torch.equal(masks[j], one_at_a_time(drafts[:j])), f"row {j}"
    assert bool((masks[5:] == -1).all())
    assert torch.equal(compiler.bitmask([state])[0], before)
    for token in drafts:
        assert state.accept(token)
