"""Speculative decoding's speed, each case with and without speculation on the same weights, same run.

Models: the 175M Mistral-geometry model of bench_engine.py (float32 and bfloat16) and the random model of
Mistral-7B's geometry that bench_quant.py builds and caches (bfloat16, and int4 with --quantization).
Two engines on the same weights, one plain (--speculative-tokens 0) and one speculative (K drafts, prompt
lookup on), run each case in turn, `--rounds` times, which goes first alternating by round; the table keeps
each one's best. Both engines share one process where the weights fit twice in memory, else (the 7B model
in bf16) each runs in its own process, one after the other. Cases, all greedy, 128-token prompt:

- right prediction: the prediction is the model's own output (every draft right: the best case);
- half-right: right for the first half, unrelated tokens after;
- all wrong: an unrelated prediction (the reply never picks it up: prompt lookup drafts after the first miss);
- wrong at every token: the output with a wrong token after each of its tokens, so the prediction re-aligns
  after every token and its next draft is always wrong (zero acceptance: what the back-off costs);
- prompt lookup, batch 1: no prediction (on random weights lookup drafts are rarely right: the cost of trying);
- 16 streams with prompt lookup on vs off: aggregate decode tokens/s while all 16 decode.

Every case checks that speculation gave the plain run's tokens; decode tokens/s is counted from
the first output to the last (the prefill left out), as bench_engine.py does.

    python benchmarks/bench_speculative.py [--models 175m 7b] [--dtype float32 bfloat16] [--quantization none int4]
                                           [--drafts 8] [--rounds 3]
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

from bench_engine import STREAMS, build_model, prompt, window_rate
from bench_quant import build_model as build_7b_model

PROMPT_LEN = 128
DECODE_TOKENS = {"175m": 128, "7b": 64}
KV_CACHE_BYTES = 2**30  # 16 streams of 192 tokens in the 7B model take 384 MiB
UNRELATED = list(range(20000, 20000 + max(DECODE_TOKENS.values())))
ENGINES = ("plain", "spec")
# Weights above this run one engine per process (two copies would not fit in memory).
MAX_SHARED_WEIGHT_BYTES = 6 * 2**30


def cases(reference: list[int]) -> dict[str, list[int] | None]:
    """Each batch-1 case's prediction (None: prompt lookup)."""
    half = len(reference) // 2
    wrong = next(t for t in UNRELATED if t not in reference)
    return {"right prediction": reference, "half-right prediction": reference[:half] + UNRELATED[half:len(reference)],
            "all-wrong prediction": UNRELATED[:len(reference)],
            "wrong at every token": [t for token in reference for t in (token, wrong)],
            "prompt lookup, batch 1": None}


# ---- the worker (one process, one or both engines) -------------------------------------------

def worker(model_dir: str, dtype: str, quantization: str, drafts: int, engines: list[str], decode_tokens: int,
           rounds: int, reference_path: str) -> dict:
    """Best decode tokens/s of each engine in `engines` on each case. Every run's tokens must equal the
    reference: the output an earlier process wrote to reference_path, else the first engine's, written there."""
    from mistral_grpc.engine.args import EngineArgs
    from mistral_grpc.engine.engine import LLMEngine
    from mistral_grpc.engine.request import GenerationRequest
    from mistral_grpc.engine.sampling_params import SamplingParams

    def engine_args(name: str) -> EngineArgs:
        k = drafts if name == "spec" else 0
        return EngineArgs(model=model_dir, device="cpu", dtype=dtype, quantization=quantization,
                          max_batch_size=STREAMS, kv_cache_memory=KV_CACHE_BYTES, speculative_tokens=k,
                          prompt_lookup=k > 0)

    async def one(engine: LLMEngine, ids: list[int], tag: str,
                  prediction: list[int] | None = None) -> tuple[list[tuple[float, int]], list[int], tuple[int, int]]:
        """(perf_counter time, completion tokens so far) at each output, the tokens, and the drafts
        (accepted, verified)."""
        request = GenerationRequest(tag, ids, SamplingParams(temperature=0.0, max_tokens=decode_tokens),
                                    prediction=None if prediction is None else tuple(prediction))
        marks, tokens = [], []
        async for out in engine.generate(request):
            marks.append((time.perf_counter(), out.completion_tokens))
            tokens += [t for d in out.deltas for t in d.token_ids]
        drafts = (out.accepted_prediction_tokens, out.accepted_prediction_tokens + out.rejected_prediction_tokens)
        return marks, tokens, drafts

    def rate(marks: list[tuple[float, int]]) -> float:
        return (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])

    async def run() -> dict:
        running = {name: LLMEngine(engine_args(name)) for name in engines}
        for engine in running.values():
            await engine.start()
            await one(engine, prompt(PROMPT_LEN, 99), "warm")
        ids = prompt(PROMPT_LEN)
        if os.path.exists(reference_path):  # an earlier process's output: every run must give it
            with open(reference_path) as f:
                reference = json.load(f)
        else:
            _, reference, _ = await one(next(iter(running.values())), ids, "reference")
            with open(reference_path, "w") as out:
                json.dump(reference, out)
        best: dict[str, dict[str, float]] = {name: {} for name in running}
        drafts: dict[str, tuple[int, int]] = {}  # the speculative engine's (accepted, verified) per case
        streams_case = f"{STREAMS} streams, prompt lookup"
        for r in range(rounds):
            # Which engine goes first alternates by round: the one that runs second may find the caches
            # and the host's bandwidth in a different state.
            order = list(running.items())[::-1 if r % 2 else 1]
            for case, prediction in cases(reference).items():
                for name, engine in order:
                    marks, tokens, counts = await one(engine, ids, f"{case}{r}", prediction)
                    assert tokens == reference, f"{name} {case}: speculation changed the output"
                    best[name][case] = max(best[name].get(case, 0.0), rate(marks))
                    if name == "spec":
                        drafts[case] = counts
            for name, engine in order:
                streams = await asyncio.gather(*(one(engine, prompt(PROMPT_LEN, 100 + i), f"s{r}.{i}")
                                                 for i in range(STREAMS)))
                best[name][streams_case] = max(best[name].get(streams_case, 0.0),
                                               window_rate([marks for marks, _, _ in streams]))
                if name == "spec":
                    drafts[streams_case] = tuple(sum(d[i] for _, _, d in streams) for i in range(2))
        for engine in running.values():
            await engine.shutdown()
        if "spec" in best:
            best["drafts"] = drafts
        return best

    return asyncio.run(run())


# ---- driver ----------------------------------------------------------------------------------

def run_worker(model_dir: str, dtype: str, quantization: str, drafts: int, engines: list[str], decode_tokens: int,
               rounds: int, reference_path: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model-dir", model_dir, "--dtype", dtype, "--quantization",
           quantization, "--drafts", str(drafts), "--engines", *engines, "--decode-tokens", str(decode_tokens),
           "--rounds", str(rounds), "--reference", reference_path]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker {' '.join(engines)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def weight_bytes(model: str, dtype: str, quantization: str) -> float:
    params = 7.2e9 if model == "7b" else 175e6
    bits = {"int8": 8, "int4": 5}.get(quantization, 32 if dtype == "float32" else 16)
    return params * bits / 8


def measure(model_dir: str, model: str, dtype: str, quantization: str, drafts: int, rounds: int,
            scratch: str, spec_first: bool) -> dict:
    """{engine: {case: best tok/s}}: both engines in one process where two copies of the weights fit, else
    one process each, the plain one first unless spec_first (which goes first can change the numbers:
    docs/speculative.md)."""
    reference = os.path.join(scratch, "reference.json")
    common = dict(model_dir=model_dir, dtype=dtype, quantization=quantization, drafts=drafts,
                  decode_tokens=DECODE_TOKENS[model], rounds=rounds, reference_path=reference)
    if weight_bytes(model, dtype, quantization) <= MAX_SHARED_WEIGHT_BYTES:
        return run_worker(engines=list(ENGINES), **common)
    best = {}
    for name in (reversed(ENGINES) if spec_first else ENGINES):
        best.update(run_worker(engines=[name], **common))
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", choices=["175m", "7b"], default=["175m", "7b"])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], help="the 175M model's dtypes")
    parser.add_argument("--quantization", nargs="+", default=["none", "int4"], help="the 7B model's schemes")
    parser.add_argument("--drafts", type=int, default=8, help="--speculative-tokens of the speculative engine")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each case per engine (the best is kept)")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/mistral-grpc-bench"),
                        help="where bench_quant.py keeps the 7B-geometry model (built there if missing)")
    parser.add_argument("--spec-first", action="store_true",
                        help="where the engines run in two processes, start with the speculative one")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--engines", nargs="+", choices=ENGINES)
    parser.add_argument("--decode-tokens", type=int)
    parser.add_argument("--model-dir")
    parser.add_argument("--reference")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model_dir, args.dtype[0], args.quantization[0], args.drafts, args.engines,
                                args.decode_tokens, args.rounds, args.reference)))
        return

    print(f"{'model':6} {'weights':9} {'case':28} {'plain tok/s':>12} {'spec tok/s':>11} {'ratio':>7} "
          f"{'drafts accepted':>16}")
    for model in args.models:
        runs = ([(dtype, "none") for dtype in args.dtype] if model == "175m"
                else [("bfloat16", scheme) for scheme in args.quantization])
        for dtype, quantization in runs:
            with tempfile.TemporaryDirectory() as scratch:
                if model == "175m":
                    model_dir = os.path.join(scratch, "model")
                    build_model(model_dir, dtype)
                else:
                    model_dir = os.path.join(args.cache_dir, "mistral-7b-random-bf16")
                    if not os.path.exists(os.path.join(model_dir, "config.json")):
                        build_7b_model(model_dir)
                best = measure(model_dir, model, dtype, quantization, args.drafts, args.rounds, scratch,
                               args.spec_first)
            weights = dtype if quantization == "none" else quantization
            for case, plain in best["plain"].items():
                spec = best["spec"][case]
                accepted, verified = best["drafts"][case]
                print(f"{model:6} {weights:9} {case:28} {plain:12.1f} {spec:11.1f} {spec / plain:6.2f}x "
                      f"{accepted:>8} / {verified:<6}", flush=True)


if __name__ == "__main__":
    main()
