"""End-to-end speed of our engine against Hugging Face transformers on the same weights, same run.

Builds one random-weight model of Mistral geometry scaled to ~175M parameters (hidden 1024, 8 layers,
8 heads, 2 KV heads, head_dim 128, FFN 3584, vocab 32000), then measures, each in its own process
(so peak RSS is each one's own): batch-1 decode tokens/s, prefill tokens/s of a 512-token prompt
(each side runs one untimed prompt of that length, then three timed ones: the best counts), aggregate tokens/s of 16 concurrent streams, and peak RSS; plus the memory-bandwidth bound of batch-1
decode and the share of it reached. The bound is the bytes a decode step reads (every weight but
the embedding table, of which it reads one row) over the best read bandwidth the extension measures
(1 GiB on huge pages, read before the runs and after each dtype's; the best of them).

16 streams: all start at once; "decode" counts the tokens of the window in which all 16 are decoding
(from the last stream's first token to the first stream's last), the rate a loaded server sustains
and the counterpart of batch-1 decode, which leaves out the prefill too; "end to end" divides all
generated tokens by the whole run, the 16 prompts' prefill included.

With --quantization int8 int4 (weight-only, benchmarks/bench_quant.py has the 7B comparison) ours also runs
with each scheme, beside transformers in the model's dtype.

    python benchmarks/bench_engine.py [--dtype float32 bfloat16] [--decode-tokens 128] [--quantization int8 int4]
"""

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

GEOMETRY = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                intermediate_size=3584, vocab_size=32000, max_position_embeddings=4096, rope_theta=1e6,
                sliding_window=None, rms_norm_eps=1e-5, tie_word_embeddings=False)
PROMPT_LEN_DECODE = 128
PROMPT_LEN_PREFILL = 512
PREFILL_SALTS = (7, 9, 10)  # three timed prompts; the best time counts (this host's timings vary ~10%)
STREAMS = 16
# Our KV cache is resident from startup (its peak RSS includes it): sized as an operator would, for
# the workload with room to spare (16 streams of 256 tokens fill 64 MiB in fp32, 32 MiB in bf16).
KV_CACHE_BYTES = 128 * 2**20


def build_model(out_dir: str, dtype: str) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    from mistral_grpc.model.demo import TOKENIZER_SOURCE

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**GEOMETRY, torch_dtype=dtype)).to(getattr(torch, dtype))
    model.save_pretrained(out_dir)
    shutil.copyfile(TOKENIZER_SOURCE, os.path.join(out_dir, "tokenizer.json"))


def reset_peak_rss() -> None:
    """A child process starts with its parent's peak RSS; Linux resets it on request."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 1024


def prompt(n: int, salt: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(1234 + salt)
    return [1] + torch.randint(100, 30000, (n - 1,), generator=g).tolist()


# ---- workers (one process each) ------------------------------------------------------------

def worker_transformers(model_dir: str, dtype: str, decode_tokens: int) -> dict:
    from transformers import MistralForCausalLM

    model = MistralForCausalLM.from_pretrained(model_dir, torch_dtype=getattr(torch, dtype)).eval()
    out = {}
    with torch.inference_mode():
        ids = torch.tensor([prompt(PROMPT_LEN_DECODE)])
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm up
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False)
        total = time.perf_counter() - t
        t = time.perf_counter()
        model(ids)
        prefill_small = time.perf_counter() - t
        out["decode_tok_s"] = (decode_tokens - 1) / max(total - prefill_small, 1e-9)
        # As generate() runs a prompt: the LM head on the last position only.
        model(torch.tensor([prompt(PROMPT_LEN_PREFILL, 8)]), logits_to_keep=1)
        times = []
        for salt in PREFILL_SALTS:
            long_ids = torch.tensor([prompt(PROMPT_LEN_PREFILL, salt)])
            t = time.perf_counter()
            model(long_ids, logits_to_keep=1)
            times.append(time.perf_counter() - t)
        out["prefill_tok_s"] = PROMPT_LEN_PREFILL / min(times)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def worker_ours(model_dir: str, dtype: str, decode_tokens: int, quantization: str = "none") -> dict:
    from mistral_grpc.engine.args import EngineArgs
    from mistral_grpc.engine.engine import LLMEngine
    from mistral_grpc.engine.request import GenerationRequest
    from mistral_grpc.engine.sampling_params import SamplingParams

    async def run() -> dict:
        engine = LLMEngine(EngineArgs(model=model_dir, device="cpu", dtype=dtype, quantization=quantization,
                                                max_batch_size=STREAMS,
                                                kv_cache_memory=KV_CACHE_BYTES, max_prefill_tokens=PROMPT_LEN_PREFILL))
        await engine.start()

        async def one(ids: list[int], max_tokens: int, tag: str) -> list[tuple[float, int]]:
            """(perf_counter time, completion tokens so far) at each output."""
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
            return [(time.perf_counter(), output.completion_tokens)
                    async for output in engine.generate(GenerationRequest(tag, ids, params))]

        out = {}
        await one(prompt(PROMPT_LEN_DECODE, 99), 4, "warm")
        marks = await one(prompt(PROMPT_LEN_DECODE), decode_tokens, "decode")
        out["decode_tok_s"] = (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])
        # Distinct prompts, so the prefix cache holds none of a timed one's blocks.
        await one(prompt(PROMPT_LEN_PREFILL, 8), 1, "warm-prefill")
        times = []
        for salt in PREFILL_SALTS:
            start = time.perf_counter()
            marks = await one(prompt(PROMPT_LEN_PREFILL, salt), 1, f"prefill{salt}")
            times.append(marks[0][0] - start)
        out["prefill_tok_s"] = PROMPT_LEN_PREFILL / min(times)
        start = time.perf_counter()
        streams = await asyncio.gather(*(one(prompt(PROMPT_LEN_DECODE, 100 + i), decode_tokens, f"s{i}")
                                         for i in range(STREAMS)))
        out["aggregate_e2e_tok_s"] = sum(m[-1][1] for m in streams) / (time.perf_counter() - start)
        out["aggregate_tok_s"] = window_rate(streams)
        await engine.shutdown()
        return out

    out = asyncio.run(run())
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def window_rate(streams: list[list[tuple[float, int]]]) -> float:
    """Tokens per second generated by all streams together while every one of them was decoding."""
    begin = max(marks[0][0] for marks in streams)
    end = min(marks[-1][0] for marks in streams)

    def count_at(marks: list[tuple[float, int]], t: float) -> int:
        return max(count for when, count in marks if when <= t)

    return sum(count_at(m, end) - count_at(m, begin) for m in streams) / (end - begin)


def read_bandwidth_gbs() -> float:
    from mistral_grpc import ops
    from mistral_grpc.memory import zeros_on_huge_pages

    # 1 GiB on huge pages as the weights are, touched so every page is resident.
    buffer = zeros_on_huge_pages((2**30,), torch.uint8).fill_(1)
    return ops.read_bandwidth(buffer, 5)


# ---- driver ----------------------------------------------------------------------------------

def run_worker(kind: str, model_dir: str, dtype: str, decode_tokens: int, quantization: str = "none") -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--model-dir", model_dir, "--dtype", dtype,
           "--decode-tokens", str(decode_tokens), "--quantization", quantization]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--worker", choices=["ours", "transformers"])
    parser.add_argument("--model-dir")
    parser.add_argument("--quantization", nargs="+", default=["none"])
    args = parser.parse_args()
    if args.worker:
        reset_peak_rss()
        if args.worker == "ours":
            result = worker_ours(args.model_dir, args.dtype[0], args.decode_tokens, args.quantization[0])
        else:
            result = worker_transformers(args.model_dir, args.dtype[0], args.decode_tokens)
        print(json.dumps(result))
        return

    # The bound takes the best read of several over the run: this VM's bandwidth drifts, and one
    # unlucky read would flatter the share of it reached.
    bandwidths = [read_bandwidth_gbs()]
    hf_fp32_decode = None
    rows = []
    for dtype in args.dtype:
        with tempfile.TemporaryDirectory() as model_dir:
            build_model(model_dir, dtype)
            weight_bytes = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
                               if f.endswith(".safetensors"))
            # A decode step reads one row of the embedding table, every other weight whole.
            weight_bytes -= GEOMETRY["vocab_size"] * GEOMETRY["hidden_size"] * getattr(torch, dtype).itemsize
            hf = run_worker("transformers", model_dir, dtype, args.decode_tokens)
            for scheme in args.quantization:
                ours = run_worker("ours", model_dir, dtype, args.decode_tokens, scheme)
                rows.append((dtype if scheme == "none" else f"{dtype} {scheme}", weight_bytes, hf, ours))
        bandwidths.append(read_bandwidth_gbs())
        if dtype == "float32":
            hf_fp32_decode = hf["decode_tok_s"]

    bandwidth = max(bandwidths)
    print(f"machine: {os.cpu_count()} cores, best read bandwidth measured by the extension: {bandwidth:.1f} GB/s "
          f"(best of {len(bandwidths)} measurements: {', '.join(f'{b:.1f}' for b in bandwidths)})")

    print(f"\n{'dtype':14} {'metric':28} {'transformers':>13} {'ours':>10} {'ratio':>7}")
    for dtype, weight_bytes, hf, ours in rows:
        bound = bandwidth * 1e9 / weight_bytes
        metrics = [("batch-1 decode tok/s", hf["decode_tok_s"], ours["decode_tok_s"]),
                   (f"prefill tok/s ({PROMPT_LEN_PREFILL} tokens)", hf["prefill_tok_s"], ours["prefill_tok_s"]),
                   (f"{STREAMS} streams decode tok/s", hf["decode_tok_s"], ours["aggregate_tok_s"]),
                   (f"{STREAMS} streams end to end tok/s", hf["decode_tok_s"], ours["aggregate_e2e_tok_s"]),
                   ("peak RSS MB", hf["peak_rss_mb"], ours["peak_rss_mb"])]
        for name, theirs, mine in metrics:
            print(f"{dtype:14} {name:28} {theirs:13.1f} {mine:10.1f} {mine / theirs:6.2f}x")
        if " " in dtype:  # quantized: the float model's bytes are not what a step reads
            continue
        print(f"{dtype:14} {'bandwidth bound tok/s':28} {'':13} {bound:10.1f} "
              f"({weight_bytes / 1e6:.0f} MB read per step; batch-1 reaches {ours['decode_tok_s'] / bound:.0%})")
        if hf_fp32_decode and not dtype.startswith("float32"):
            print(f"{dtype:14} {'decode vs transformers fp32':28} {hf_fp32_decode:13.1f} "
                  f"{ours['decode_tok_s']:10.1f} {ours['decode_tok_s'] / hf_fp32_decode:6.2f}x")
    print(f"\n('{STREAMS} streams' compares our aggregate with transformers' batch-1 decode, as the target does.)")


if __name__ == "__main__":
    main()
