"""The engine end to end on the demo model: batching changes no result, cancellation and preemption
leak no KV block, stops, budgets, n > 1 and the prefix cache behave as a caller expects."""

import asyncio
import random
from collections.abc import Iterator

import pytest

from mistral_grpc.engine.args import EngineArgs
from mistral_grpc.engine.engine import MAX_BACKLOG, LLMEngine, default_cpu_kv_bytes
from mistral_grpc.engine.request import GenerationOutput, GenerationRequest, PromptTooLongError, QueueFullError
from mistral_grpc.engine.sampling_params import SamplingParams
from mistral_grpc.metrics import REGISTRY
from mistral_grpc.tokenizer import ChatMessage


class Harness:
    """One demo engine on its own event loop, shared by the tests of this module."""

    def __init__(self, device: str = "cpu", **engine_args) -> None:
        self.loop = asyncio.new_event_loop()
        self.engine = LLMEngine(EngineArgs(device=device, **engine_args))
        self.run(self.engine.start())
        self._ids = iter(range(10**9))

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def prompt(self, text: str) -> list[int]:
        return self.engine.tokenizer.encode_chat([ChatMessage(role="user", content=text)])

    async def collect(self, prompt: list[int], **params) -> list[GenerationOutput]:
        request = GenerationRequest(f"t{next(self._ids)}", prompt, SamplingParams(**params))
        return [out async for out in self.engine.generate(request)]

    def close(self) -> None:
        self.run(self.engine.shutdown())
        self.loop.close()


def text_of(outputs: list[GenerationOutput], index: int = 0) -> str:
    return "".join(d.text for o in outputs for d in o.deltas if d.index == index)


def tokens_of(outputs: list[GenerationOutput], index: int = 0) -> list[int]:
    return [t for o in outputs for d in o.deltas if d.index == index for t in d.token_ids]


def finish_of(outputs: list[GenerationOutput], index: int = 0) -> str | None:
    return [d.finish_reason for o in outputs for d in o.deltas if d.index == index][-1]


@pytest.fixture(scope="module")
def h() -> Iterator[Harness]:
    harness = Harness(kv_cache_memory=32 * 2**20, max_batch_size=16, max_prefill_tokens=64)
    yield harness
    harness.close()


def test_greedy_output_is_the_same_alone_and_batched(h: Harness) -> None:
    prompts = [h.prompt(f"Tell me about topic {i}" + " please" * i) for i in range(6)]
    alone = [tokens_of(h.run(h.collect(p, temperature=0.0, max_tokens=12))) for p in prompts]

    async def together():
        return await asyncio.gather(*(h.collect(p, temperature=0.0, max_tokens=12) for p in prompts))

    assert [tokens_of(o) for o in h.run(together())] == alone
    assert h.engine.kv_blocks_used() == 0


def test_a_seed_gives_the_same_tokens_whatever_shares_the_batch(h: Harness) -> None:
    p = h.prompt("seeded")
    alone = tokens_of(h.run(h.collect(p, temperature=1.0, top_p=0.9, seed=42, max_tokens=10)))

    async def crowded():
        others = [h.collect(h.prompt(f"noise {i}"), temperature=1.0, max_tokens=10) for i in range(5)]
        results = await asyncio.gather(*others[:2], h.collect(p, temperature=1.0, top_p=0.9, seed=42, max_tokens=10),
                                       *others[2:])
        return results[2]

    assert tokens_of(h.run(crowded())) == alone
    different = tokens_of(h.run(h.collect(p, temperature=1.0, top_p=0.9, seed=43, max_tokens=10)))
    assert different != alone


@pytest.mark.parametrize("dtype,quantization", [("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int8"),
                                                ("float32", "int4"), ("bfloat16", "int4")])
def test_seeded_choices_are_bit_identical_alone_and_in_any_batch(dtype: str, quantization: str) -> None:
    """The seed contract to the last bit of every logprob. Prompts of 20 to 160 tokens: cut into
    chunks differently as others use the step's prompt budget, on the prompt kernels (AMX where the
    CPU has it) whatever their number, partly served from the prefix cache the solo runs filled; decode
    batches of one to eight rows. On the demo's flat distributions a rounding difference anywhere
    changes a sampled token within a few dozen."""
    harness = Harness(dtype=dtype, quantization=quantization, kv_cache_memory=64 * 2**20, max_batch_size=16,
                      max_prefill_tokens=64)
    try:
        prompts = [harness.prompt(f"story number {i} " * (4 + 7 * i)) for i in range(8)]

        async def one(i: int) -> list[GenerationOutput]:
            return await harness.collect(prompts[i], temperature=0.9, seed=i, max_tokens=48, logprobs=True)

        def trace(outputs: list[GenerationOutput]) -> list[tuple[int, float]]:
            tokens = [t for o in outputs for d in o.deltas for t in d.token_ids]
            return list(zip(tokens, [lp.logprob for o in outputs for d in o.deltas for lp in d.logprobs], strict=True))

        alone = [trace(harness.run(one(i))) for i in range(8)]
        assert all(len(t) == 48 for t in alone)

        async def together(order: list[int]) -> list[list[GenerationOutput]]:
            return await asyncio.gather(*(one(i) for i in order))

        for order in ([*range(8)], [7, 2, 5, 0, 3, 6, 1, 4]):
            for i, outputs in zip(order, harness.run(together(order))):
                assert trace(outputs) == alone[i], f"prompt {i} ({len(prompts[i])} tokens) in order {order}"
        assert harness.engine.kv_blocks_used() == 0
    finally:
        harness.close()


def test_budget_ends_with_length_and_exact_usage(h: Harness) -> None:
    p = h.prompt("count")
    outputs = h.run(h.collect(p, temperature=0.0, max_tokens=7))
    assert finish_of(outputs) == "length" and len(tokens_of(outputs)) == 7
    assert outputs[-1].prompt_tokens == len(p) and outputs[-1].completion_tokens == 7 and outputs[-1].finished


def test_stop_string_ends_generation_and_is_not_sent(h: Harness) -> None:
    p = h.prompt("stop somewhere")
    full = text_of(h.run(h.collect(p, temperature=0.0, max_tokens=24)))
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3
    outputs = h.run(h.collect(p, temperature=0.0, max_tokens=24, stop=(stop,)))
    assert finish_of(outputs) == "stop"
    assert text_of(outputs) == full[: full.index(stop)]


def test_n_choices_share_the_prompt_blocks(h: Harness) -> None:
    p = h.prompt("a fairly long shared prompt " * 8)
    before = h.engine._core.scheduler.prefix_hit_tokens
    outputs = h.run(h.collect(p, temperature=1.0, seed=7, max_tokens=5, n=3))
    assert sorted({d.index for o in outputs for d in o.deltas}) == [0, 1, 2]
    assert all(finish_of(outputs, i) == "length" for i in range(3))
    assert outputs[-1].completion_tokens == 15
    hits = h.engine._core.scheduler.prefix_hit_tokens - before
    assert hits >= 2 * (len(p) - 2 * h.engine.args.block_size)  # choices 1 and 2 reused choice 0's blocks


def test_a_repeated_prompt_reuses_the_cached_prefix(h: Harness) -> None:
    p = h.prompt("the same system prompt and question " * 6)
    h.run(h.collect(p, temperature=0.0, max_tokens=2))
    before = h.engine._core.scheduler.prefix_hit_tokens
    h.run(h.collect(p, temperature=0.0, max_tokens=2))
    assert h.engine._core.scheduler.prefix_hit_tokens - before >= len(p) - 2 * h.engine.args.block_size


def test_too_long_a_request_is_refused_before_it_runs(h: Harness) -> None:
    with pytest.raises(PromptTooLongError, match=str(h.engine.max_model_len)):
        h.engine.generate(GenerationRequest("long", h.prompt("x"), SamplingParams(max_tokens=h.engine.max_model_len)))


def test_randomised_requests_with_cancellations_leave_zero_blocks(h: Harness) -> None:
    rng = random.Random(0)

    async def one(i: int) -> None:
        params = dict(temperature=rng.choice([0.0, 0.7, 1.0]), max_tokens=rng.randint(1, 12), n=rng.choice([1, 1, 2]),
                      seed=rng.randrange(100), stop=rng.choice([(), ("e",), ("the", "a")]))
        consumer = h.collect(h.prompt("request %d " % i + "word " * rng.randint(0, 40)), **params)
        if rng.random() < 0.3:  # the caller goes away part-way
            task = asyncio.ensure_future(consumer)
            await asyncio.sleep(rng.random() * 0.05)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        else:
            outputs = await consumer
            assert outputs[-1].finished

    async def wave(start: int) -> None:
        await asyncio.gather(*(one(start + i) for i in range(25)))

    for start in range(0, 200, 25):
        h.run(wave(start))
    h.run(asyncio.sleep(0.2))  # aborts are applied at the worker's next turn
    assert h.engine.kv_blocks_used() == 0


@pytest.mark.cuda
def test_on_cuda_the_engine_matches_cpu_and_leaks_no_block() -> None:
    """The whole engine on CUDA (the extension's CUDA kernels, cuBLAS for the linear layers): the CPU
    engine's greedy tokens on the same fp32 weights (the demo's logits spread over a few units, far
    beyond the two devices' rounding), then a crowd of sampled requests with cancellations that ends
    holding zero blocks."""
    texts = ["hello there", "tell me a story " * 8, "one two three", "x" * 200]
    cpu = Harness(dtype="float32", kv_cache_memory=32 * 2**20)
    try:
        prompts = [cpu.prompt(text) for text in texts]
        on_cpu = [tokens_of(cpu.run(cpu.collect(p, temperature=0.0, max_tokens=24))) for p in prompts]
    finally:
        cpu.close()
    gpu = Harness("cuda", dtype="float32", kv_cache_memory=64 * 2**20, max_batch_size=16, max_prefill_tokens=64)
    try:
        assert [tokens_of(gpu.run(gpu.collect(p, temperature=0.0, max_tokens=24))) for p in prompts] == on_cpu

        async def crowd() -> list[list[GenerationOutput]]:
            tasks = [asyncio.ensure_future(gpu.collect(prompts[i % 4], temperature=0.8, top_p=0.9, seed=i,
                                                       max_tokens=32, n=1 + i % 2)) for i in range(16)]
            await asyncio.sleep(0.05)
            for task in tasks[::3]:
                task.cancel()
            return [r for r in await asyncio.gather(*tasks, return_exceptions=True) if isinstance(r, list)]

        finished = gpu.run(crowd())
        assert finished and all(outputs[-1].finished for outputs in finished)
        gpu.run(asyncio.sleep(0.2))  # aborts are applied at the worker's next turn
        assert gpu.engine.kv_blocks_used() == 0
    finally:
        gpu.close()


def test_preemption_under_a_tiny_cache_changes_no_greedy_result() -> None:
    block_bytes = 2 * 4 * 16 * 2 * 32 * 4  # k and v, 4 layers, 16 tokens, 2 KV heads, head_dim 32, fp32
    small = Harness(kv_cache_memory=16 * block_bytes, max_batch_size=8, max_prefill_tokens=64)
    try:
        prompts = [small.prompt(f"preempt me {i} " + "pad " * 20) for i in range(6)]
        alone = [tokens_of(small.run(small.collect(p, temperature=0.0, max_tokens=40))) for p in prompts]

        async def together():
            return await asyncio.gather(*(small.collect(p, temperature=0.0, max_tokens=40) for p in prompts))

        preempted = REGISTRY.get_sample_value("mistral_grpc_preemptions_total")
        assert [tokens_of(o) for o in small.run(together())] == alone
        assert small.engine._core.scheduler.num_preemptions > 0
        assert REGISTRY.get_sample_value("mistral_grpc_preemptions_total") - preempted == (
            small.engine._core.scheduler.num_preemptions)
        assert small.engine.kv_blocks_used() == 0
    finally:
        small.close()


def test_a_caller_that_stops_taking_outputs_pauses_its_request_not_the_others(h: Harness) -> None:
    """A stream whose reader stops reading stops taking outputs: past MAX_BACKLOG untaken ones its
    request sits out the steps (no compute, no growing buffer) while others run; once the caller
    reads again it resumes, and its tokens are the ones it would have had without the pause."""
    p = h.prompt("a long answer, read slowly")
    params = dict(temperature=1.0, seed=5, max_tokens=3 * MAX_BACKLOG)
    reference = tokens_of(h.run(h.collect(p, **params)))
    core = h.engine._core
    steps = 0
    step = core.step

    def counting_step() -> bool:
        nonlocal steps
        steps += 1
        return step()

    async def stall_then_read():
        stalled = h.engine.generate(GenerationRequest("stalled", p, SamplingParams(**params)))
        outputs = [await anext(stalled)]
        other = await h.collect(h.prompt("meanwhile"), temperature=0.0, max_tokens=2 * MAX_BACKLOG)
        await asyncio.sleep(0.2)
        [seq] = [c.seq for c in core._requests["stalled"].choices]
        generated, steps_before = seq.num_output, steps
        await asyncio.sleep(0.3)
        idle = (seq.num_output, steps) == (generated, steps_before)
        gauges = [REGISTRY.get_sample_value(f"mistral_grpc_{name}_requests") for name in ("held", "running")]
        outputs += [out async for out in stalled]
        return outputs, other, generated, idle, gauges

    core.step = counting_step
    try:
        outputs, other, generated, idle, gauges = h.run(stall_then_read())
    finally:
        del core.step
    assert MAX_BACKLOG <= generated <= MAX_BACKLOG + 1  # one taken, MAX_BACKLOG untaken
    assert idle  # the worker waits: no step, no token while the caller holds back
    assert gauges == [1, 0]  # held, not running
    assert len(tokens_of(other)) == 2 * MAX_BACKLOG and finish_of(other) == "length"
    assert tokens_of(outputs) == reference and finish_of(outputs) == "length"
    assert h.engine.kv_blocks_used() == 0


def test_preemption_changes_no_seeded_result_to_the_last_bit() -> None:
    """A preempted sequence recomputes its prompt on the prompt kernels and its generated tokens each as
    a decode (one attention entry per token): the same arithmetic that made them, so its tokens and
    logprobs stay those it gets alone, bit for bit."""
    block_bytes = 2 * 4 * 16 * 2 * 32 * 4  # k and v, 4 layers, 16 tokens, 2 KV heads, head_dim 32, fp32
    small = Harness(kv_cache_memory=24 * block_bytes, max_batch_size=8, max_prefill_tokens=64)
    try:
        prompts = [small.prompt(f"preempt me {i} " + "pad " * 20) for i in range(6)]
        params = [dict(temperature=0.9, seed=i, max_tokens=120, logprobs=True) for i in range(6)]

        def trace(outputs):
            return [(t, lp.logprob) for o in outputs for d in o.deltas for t, lp in zip(d.token_ids, d.logprobs)]

        alone = [trace(small.run(small.collect(p, **k))) for p, k in zip(prompts, params)]
        preempted = small.engine._core.scheduler.num_preemptions

        async def together():
            return await asyncio.gather(*(small.collect(p, **k) for p, k in zip(prompts, params)))

        assert [trace(o) for o in small.run(together())] == alone
        assert small.engine._core.scheduler.num_preemptions > preempted
    finally:
        small.close()


def test_the_warm_up_counts_in_no_metric() -> None:
    """The engine's own warm-up request at startup is not traffic: the token counters and latency
    histograms start at what callers asked for."""
    names = ["mistral_grpc_prompt_tokens_total", "mistral_grpc_generation_tokens_total",
             "mistral_grpc_time_to_first_token_seconds_count", "mistral_grpc_inter_token_latency_seconds_count"]
    before = [REGISTRY.get_sample_value(name) for name in names]
    fresh = Harness(kv_cache_memory=8 * 2**20)
    try:
        assert [REGISTRY.get_sample_value(name) for name in names] == before
    finally:
        fresh.close()


def test_the_queue_bound_refuses_the_excess_at_once() -> None:
    tiny = Harness(kv_cache_memory=8 * 2**20, max_batch_size=1, max_queue=1)
    try:
        async def flood():
            first = tiny.engine.generate(GenerationRequest("q1", tiny.prompt("a"), SamplingParams(max_tokens=50)))
            second = tiny.engine.generate(GenerationRequest("q2", tiny.prompt("b"), SamplingParams(max_tokens=50)))
            started = [asyncio.ensure_future(anext(first)), asyncio.ensure_future(anext(second))]
            await asyncio.sleep(0)
            with pytest.raises(QueueFullError):
                tiny.engine.generate(GenerationRequest("q3", tiny.prompt("c"), SamplingParams(max_tokens=5)))
            await asyncio.gather(*started)
            await first.aclose()
            await second.aclose()

        tiny.run(flood())
    finally:
        tiny.close()


def test_a_tokenizer_larger_than_the_model_vocabulary_fails_the_start(tmp_path) -> None:
    import dataclasses
    import json
    import shutil

    from safetensors.torch import save_file

    from mistral_grpc.model.demo import TOKENIZER_SOURCE, demo_config, demo_weights

    config = dataclasses.replace(demo_config(), vocab_size=1000)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    save_file(demo_weights(config), str(tmp_path / "model.safetensors"))
    shutil.copyfile(TOKENIZER_SOURCE, tmp_path / "tokenizer.json")
    engine = LLMEngine(EngineArgs(model=str(tmp_path), device="cpu", kv_cache_memory=2**20))
    with pytest.raises(ValueError, match="32000 tokens but the model's vocab_size is 1000"):
        asyncio.run(engine.start())
    assert not engine.ready


def test_the_default_cpu_kv_cache_is_2gib_or_half_the_available_memory(tmp_path) -> None:
    # Resident from startup, so a small machine must not give it all its memory.
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    assert default_cpu_kv_bytes(str(meminfo)) == 2 * 2**30
    meminfo.write_text("MemTotal:        4000000 kB\nMemAvailable:    3000000 kB\n")
    assert default_cpu_kv_bytes(str(meminfo)) == 3000000 * 1024 // 2
    assert default_cpu_kv_bytes(str(tmp_path / "missing")) == 2 * 2**30
