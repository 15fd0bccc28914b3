"""Speculative decoding's speed, each case with and without speculation on the same weights, same run.

Models: the 175M Mistral-geometry model of bench_engine.py (float32 and bfloat16) and a model of
Mistral-7B's geometry (bfloat16; random weights, written shard by shard, ~14.5 GB on disk and in
memory). Each engine runs in its own process: one with --speculative-tokens 0 (plain), one with
speculation (K drafts, prompt lookup on). Cases, all greedy, 128 generated tokens after a 128-token prompt:

- right prediction: the prediction is the model's own output (every draft right: the best case);
- half-right: right for the first half, unrelated tokens after;
- all wrong: an unrelated prediction;
- prompt lookup, batch 1: no prediction (on random weights lookup drafts are almost never right:
  the cost of trying);
- 16 streams with prompt lookup on vs off: aggregate decode tokens/s while all 16 decode.

Every case checks that speculation gave the plain run's tokens; decode tokens/s is counted from
the first output to the last (the prefill left out), as bench_engine.py does.

    python benchmarks/bench_speculative.py [--models 175m 7b] [--dtype float32 bfloat16] [--drafts 8]
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from bench_engine import GEOMETRY, STREAMS, build_model, prompt, window_rate

GEOMETRY_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                   head_dim=128, intermediate_size=14336, vocab_size=32000, max_position_embeddings=32768,
                   rope_theta=1e6, sliding_window=None, rms_norm_eps=1e-5)
PROMPT_LEN = 128
DECODE_TOKENS = 128
KV_CACHE_BYTES = 256 * 2**20
UNRELATED = list(range(20000, 20000 + DECODE_TOKENS))


def build_7b_geometry(out_dir: str) -> None:
    """Random bf16 weights of Mistral-7B's shape, one safetensors shard per layer (never the whole
    model in memory), with the demo's tokenizer."""
    import shutil

    from safetensors.torch import save_file

    from mistral_grpc.model.config import MistralConfig
    from mistral_grpc.model.demo import TOKENIZER_SOURCE

    config = MistralConfig(**GEOMETRY_7B, torch_dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    h, f = config.hidden_size, config.intermediate_size

    def projection(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=generator) * cols ** -0.5).to(torch.bfloat16)

    shards: list[dict[str, torch.Tensor]] = [{
        "model.embed_tokens.weight": torch.randn(config.vocab_size, h, generator=generator).to(torch.bfloat16),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
        "lm_head.weight": (torch.randn(config.vocab_size, h, generator=generator) * 3 * h ** -0.5).to(torch.bfloat16),
    }]
    weight_map = {name: "model-00000.safetensors" for name in shards[0]}
    save_file(shards[0], os.path.join(out_dir, "model-00000.safetensors"), metadata={"format": "pt"})
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        layer = {p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                 p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                 p + "self_attn.q_proj.weight": projection(config.q_size, h),
                 p + "self_attn.k_proj.weight": projection(config.kv_size, h),
                 p + "self_attn.v_proj.weight": projection(config.kv_size, h),
                 p + "self_attn.o_proj.weight": projection(h, config.q_size),
                 p + "mlp.gate_proj.weight": projection(f, h),
                 p + "mlp.up_proj.weight": projection(f, h),
                 p + "mlp.down_proj.weight": projection(h, f)}
        shard = f"model-{i + 1:05d}.safetensors"
        save_file(layer, os.path.join(out_dir, shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in layer})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as out:
        json.dump({"metadata": {}, "weight_map": weight_map}, out)
    with open(os.path.join(out_dir, "config.json"), "w") as out:
        json.dump(config.to_dict(), out)
    shutil.copyfile(TOKENIZER_SOURCE, os.path.join(out_dir, "tokenizer.json"))


# ---- the worker (one process per engine) -----------------------------------------------------

def worker(model_dir: str, dtype: str, drafts: int, reference_path: str) -> dict:
    """Runs every case on one engine; the plain one (drafts 0) writes its tokens to reference_path,
    the speculative one reads them (its predictions) and checks it made the same."""
    from mistral_grpc.engine.args import EngineArgs
    from mistral_grpc.engine.engine import LLMEngine
    from mistral_grpc.engine.request import GenerationRequest
    from mistral_grpc.engine.sampling_params import SamplingParams

    async def run() -> dict:
        engine = LLMEngine(EngineArgs(model=model_dir, device="cpu", dtype=dtype, max_batch_size=STREAMS,
                                                kv_cache_memory=KV_CACHE_BYTES, speculative_tokens=drafts,
                                                prompt_lookup=drafts > 0))
        await engine.start()

        async def one(ids: list[int], tag: str,
                      prediction: list[int] | None = None) -> tuple[list[tuple[float, int]], list[int]]:
            """(perf_counter time, completion tokens so far) at each output, and the tokens."""
            request = GenerationRequest(tag, ids, SamplingParams(temperature=0.0, max_tokens=DECODE_TOKENS),
                                        prediction=None if prediction is None else tuple(prediction))
            marks, tokens = [], []
            async for out in engine.generate(request):
                marks.append((time.perf_counter(), out.completion_tokens))
                tokens += [t for d in out.deltas for t in d.token_ids]
            return marks, tokens

        def rate(marks: list[tuple[float, int]]) -> float:
            return (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])

        await one(prompt(PROMPT_LEN, 99), "warm")
        ids = prompt(PROMPT_LEN)
        if drafts == 0:
            _, reference = await one(ids, "reference")
            with open(reference_path, "w") as out:
                json.dump(reference, out)
        else:
            with open(reference_path) as f:
                reference = json.load(f)
        half = DECODE_TOKENS // 2
        cases = {"right prediction": reference, "half-right prediction": reference[:half] + UNRELATED[half:],
                 "all-wrong prediction": UNRELATED, "prompt lookup, batch 1": None}
        out = {}
        for name, prediction in cases.items():
            marks, tokens = await one(ids, name, prediction)
            assert tokens == reference, f"{name}: speculation changed the output"
            out[name] = rate(marks)
        streams = await asyncio.gather(*(one(prompt(PROMPT_LEN, 100 + i), f"s{i}") for i in range(STREAMS)))
        out[f"{STREAMS} streams, prompt lookup"] = window_rate([marks for marks, _ in streams])
        await engine.shutdown()
        return out

    return asyncio.run(run())


# ---- driver ----------------------------------------------------------------------------------

def run_worker(model_dir: str, dtype: str, drafts: int, reference_path: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model-dir", model_dir, "--dtype", dtype, "--drafts", str(drafts),
           "--reference", reference_path]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def runs(models: list[str], dtypes: list[str]) -> list[tuple[str, str]]:
    """(model, dtype) pairs: the 175M model in each dtype asked for, the 7B-geometry one in bf16."""
    return [(model, dtype) for model in models for dtype in (dtypes if model == "175m" else ["bfloat16"])]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", choices=["175m", "7b"], default=["175m", "7b"])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--drafts", type=int, default=8, help="--speculative-tokens of the speculative engine")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--model-dir")
    parser.add_argument("--reference")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model_dir, args.dtype[0], args.drafts, args.reference)))
        return

    print(f"{'model':6} {'dtype':9} {'case':28} {'plain tok/s':>12} {'spec tok/s':>11} {'ratio':>7}")
    for model, dtype in runs(args.models, args.dtype):
        with tempfile.TemporaryDirectory() as model_dir:
            if model == "175m":
                build_model(model_dir, dtype)
            else:
                build_7b_geometry(model_dir)
            reference = os.path.join(model_dir, "reference.json")
            plain = run_worker(model_dir, dtype, 0, reference)
            spec = run_worker(model_dir, dtype, args.drafts, reference)
        for case, base in plain.items():
            print(f"{model:6} {dtype:9} {case:28} {base:12.1f} {spec[case]:11.1f} {spec[case] / base:6.2f}x")


if __name__ == "__main__":
    main()
