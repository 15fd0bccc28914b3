"""Decode speed of the demo engine with and without structured output (JSON mode), same run.

For each batch size, `streams` concurrent requests decode up to `--tokens` tokens each as free text,
under response_format json_object, and under a json_schema. Decode tokens/s counts the tokens after
each request's first one over the time from the first first-token to the last token, so prefill and
request setup are left out. The table gives medians over the repeats, the share of free text's speed
taken repeat by repeat (modes run back to back, so the ratio survives a machine whose load drifts).
Random weights seldom close a JSON string, so most requests run their whole budget (json_object may
end early, at "{}"); the schema's one string property never lets them.

    python benchmarks/bench_structured.py [--tokens 128] [--streams 1 16 64] [--repeats 5]
"""

import argparse
import asyncio
import statistics
import time

from mistral_grpc.engine.args import EngineArgs
from mistral_grpc.engine.engine import LLMEngine
from mistral_grpc.engine.request import GenerationRequest
from mistral_grpc.engine.sampling_params import SamplingParams, StructuredSpec
from mistral_grpc.tokenizer import ChatMessage

SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
MODES = {"text": None, "json_object": StructuredSpec.json_object(), "json_schema": StructuredSpec.json_schema(SCHEMA)}


async def decode_rate(engine: LLMEngine, prompt: list[int], spec: StructuredSpec | None, streams: int,
                      tokens: int, run: int) -> float:
    async def one(i: int) -> tuple[int, float, float]:
        params = SamplingParams(seed=run * streams + i, max_tokens=tokens, structured=spec)
        made, first, last = 0, 0.0, 0.0
        async for out in engine.generate(GenerationRequest(f"{run}-{i}", prompt, params)):
            last = time.perf_counter()
            first = first or last
            made += sum(len(d.token_ids) for d in out.deltas)
        return made - 1, first, last

    timings = await asyncio.gather(*(one(i) for i in range(streams)))
    span = max(last for _, _, last in timings) - min(first for _, first, _ in timings)
    return sum(made for made, _, _ in timings) / span


async def main(args: argparse.Namespace) -> None:
    engine = LLMEngine(EngineArgs(device="cpu", kv_cache_memory=256 * 2**20,
                                            max_batch_size=max(args.streams), max_prefill_tokens=4096))
    await engine.start()
    prompt = engine.tokenizer.encode_chat([ChatMessage(role="user", content="Describe a person as JSON.")])
    run = 0
    print(f"{'streams':>7} {'mode':>12} {'tokens/s':>10} {'vs text':>8}")
    for streams in args.streams:
        rates: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):  # modes back to back, so a change in the machine's load hits each alike
            for mode, spec in MODES.items():
                run += 1
                rates[mode].append(await decode_rate(engine, prompt, spec, streams, args.tokens, run))
        for mode, values in rates.items():
            ratio = statistics.median(v / t for v, t in zip(values, rates["text"]))
            print(f"{streams:>7} {mode:>12} {statistics.median(values):>10.1f} {ratio:>8.1%}")
    await engine.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
