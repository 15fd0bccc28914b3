"""Quantized weights: our --quantization none/int8/int4 against llama.cpp bf16/Q8_0/Q4_K_M on the same weights.

Builds once (cached under --cache-dir, ~41 GB, not in CI) a random-weight model of Mistral-7B-Instruct-v0.2's
geometry in bf16 safetensors and, with llama-cpp-python (`pip install -e .[bench]`; it builds from source), the
same weights as GGUF bf16, Q8_0 and Q4_K_M (its sdist's convert_hf_to_gguf.py, then llama_model_quantize).
Then, each run in its own process (peak RSS is each one's own), scheme by scheme, ours and theirs in
--rounds rounds (ours first, then theirs first, and so on), each engine's best round printed:
batch-1 decode tokens/s (a 128-token prompt, 64 greedy tokens), prefill tokens/s (512 tokens, best of two
after a warm-up), load time and peak RSS (the largest of the rounds). Beside them: torch's own weight-only kernels
(aten._weight_int8pack_mm, aten._weight_int4pack_mm_for_cpu) and ours on one layer's matrices at batch 1,
and the weight error (relative Frobenius norm against the bf16 source, per matrix kind) of our int8/int4
beside llama.cpp's Q8_0/Q4_K_M (dequantized with the gguf package).

    python benchmarks/bench_quant.py [--cache-dir ~/.cache/mistral-grpc-bench] [--skip-llama] [--rounds 2]
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tarfile
import time

import torch

GEOMETRY = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=14336, vocab_size=32000, max_position_embeddings=32768, rope_theta=1e6,
                sliding_window=None, rms_norm_eps=1e-5, tie_word_embeddings=False)
PROMPT_LEN_DECODE, DECODE_TOKENS, PROMPT_LEN_PREFILL = 128, 64, 512
KV_CACHE_BYTES = 256 * 2**20
LLAMA_TYPES = {"bf16": None, "q8_0": 7, "q4_k_m": 15}  # llama_ftype values
PAIRS = [("none", "bf16"), ("int8", "q8_0"), ("int4", "q4_k_m")]
LAYER_KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def prompt(n: int, salt: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(1234 + salt)
    return [1] + torch.randint(100, 30000, (n - 1,), generator=g).tolist()


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


# ---- building the weights once ---------------------------------------------------------------

def build_model(model_dir: str) -> None:
    """Random bf16 weights (std 0.02, norms 1), one safetensors shard per 4 layers so memory stays low."""
    from safetensors.torch import save_file

    from mistral_grpc.model.demo import TOKENIZER_SOURCE

    os.makedirs(model_dir, exist_ok=True)
    g = GEOMETRY
    h, f, v = g["hidden_size"], g["intermediate_size"], g["vocab_size"]
    q, kv = g["num_attention_heads"] * g["head_dim"], g["num_key_value_heads"] * g["head_dim"]
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), "gate_proj": (f, h),
              "up_proj": (f, h), "down_proj": (h, f)}
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    weight_map = {}
    layers_per_shard = 4
    shards = g["num_hidden_layers"] // layers_per_shard + 1
    for s in range(shards):
        tensors = {}
        for i in range(s * layers_per_shard, min(g["num_hidden_layers"], (s + 1) * layers_per_shard)):
            p = f"model.layers.{i}."
            for kind, shape in shapes.items():
                module = "self_attn" if kind.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
                tensors[f"{p}{module}.{kind}.weight"] = rand(*shape)
            tensors[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
            tensors[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        if s == shards - 1:
            tensors.update({"model.embed_tokens.weight": rand(v, h), "lm_head.weight": rand(v, h),
                            "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)})
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, os.path.join(model_dir, name), metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})
        del tensors
    with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as out:
        json.dump({"metadata": {}, "weight_map": weight_map}, out)
    config = {**GEOMETRY, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
              "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    with open(os.path.join(model_dir, "config.json"), "w") as out:
        json.dump(config, out)
    with open(TOKENIZER_SOURCE, "rb") as src, open(os.path.join(model_dir, "tokenizer.json"), "wb") as dst:
        dst.write(src.read())


def llama_sdist_converter(cache_dir: str) -> str:
    """convert_hf_to_gguf.py from llama-cpp-python's sdist (the version installed), unpacked once."""
    import importlib.metadata

    version = importlib.metadata.version("llama-cpp-python")
    root = os.path.join(cache_dir, f"llama-cpp-python-{version}")
    script = glob.glob(os.path.join(root, "*", "vendor", "llama.cpp", "convert_hf_to_gguf.py"))
    if script:
        return script[0]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={version}", "-d", root], check=True)
    with tarfile.open(glob.glob(os.path.join(root, "*.tar.gz"))[0]) as sdist:
        sdist.extractall(root, filter="data")
    return glob.glob(os.path.join(root, "*", "vendor", "llama.cpp", "convert_hf_to_gguf.py"))[0]


def build_gguf(cache_dir: str, model_dir: str) -> dict[str, str]:
    import llama_cpp

    paths = {t: os.path.join(cache_dir, f"mistral-7b-random-{t}.gguf") for t in LLAMA_TYPES}
    if not os.path.exists(paths["bf16"]):
        subprocess.run([sys.executable, llama_sdist_converter(cache_dir), model_dir, "--outtype", "bf16",
                        "--outfile", paths["bf16"]], check=True)
    for t, ftype in LLAMA_TYPES.items():
        if ftype is not None and not os.path.exists(paths[t]):
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.nthread = os.cpu_count()
            rc = llama_cpp.llama_model_quantize(paths["bf16"].encode(), paths[t].encode(), params)
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize {t} failed ({rc})")
    return paths


# ---- workers (one process each) --------------------------------------------------------------

def worker_ours(model_dir: str, scheme: str) -> dict:
    import asyncio

    from mistral_grpc.engine.args import EngineArgs
    from mistral_grpc.engine.engine import LLMEngine
    from mistral_grpc.engine.request import GenerationRequest
    from mistral_grpc.engine.sampling_params import SamplingParams

    async def run() -> dict:
        start = time.perf_counter()
        engine = LLMEngine(EngineArgs(model=model_dir, device="cpu", dtype="bfloat16", quantization=scheme,
                                                kv_cache_memory=KV_CACHE_BYTES, max_prefill_tokens=PROMPT_LEN_PREFILL))
        await engine.start()
        out = {"load_s": time.perf_counter() - start, "load_peak_rss_mb": peak_rss_mb()}

        async def one(ids: list[int], max_tokens: int, tag: str) -> list[tuple[float, int]]:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
            return [(time.perf_counter(), o.completion_tokens)
                    async for o in engine.generate(GenerationRequest(tag, ids, params))]

        marks = await one(prompt(PROMPT_LEN_DECODE), DECODE_TOKENS, "decode")
        out["decode_tok_s"] = (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])
        await one(prompt(PROMPT_LEN_PREFILL, 8), 1, "warm-prefill")
        times = []
        for salt in (7, 9):
            begin = time.perf_counter()
            marks = await one(prompt(PROMPT_LEN_PREFILL, salt), 1, f"prefill{salt}")
            times.append(marks[0][0] - begin)
        out["prefill_tok_s"] = PROMPT_LEN_PREFILL / min(times)
        await engine.shutdown()
        return out

    out = asyncio.run(run())
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def worker_llama(gguf_path: str) -> dict:
    import llama_cpp

    start = time.perf_counter()
    llm = llama_cpp.Llama(gguf_path, n_ctx=1024, n_batch=PROMPT_LEN_PREFILL, n_ubatch=PROMPT_LEN_PREFILL,
                          n_threads=os.cpu_count(), n_threads_batch=os.cpu_count(), verbose=False)
    llm.eval(prompt(8, 99))  # touches every weight, as our warm-up does
    out = {"load_s": time.perf_counter() - start, "load_peak_rss_mb": peak_rss_mb()}
    llm.reset()
    llm.eval(prompt(PROMPT_LEN_DECODE))
    token = int(llm.scores[llm.n_tokens - 1].argmax())
    begin = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        llm.eval([token])
        token = int(llm.scores[llm.n_tokens - 1].argmax())
    out["decode_tok_s"] = DECODE_TOKENS / (time.perf_counter() - begin)
    times = []
    for salt in (8, 7, 9):
        llm.reset()
        begin = time.perf_counter()
        llm.eval(prompt(PROMPT_LEN_PREFILL, salt))
        times.append(time.perf_counter() - begin)
    out["prefill_tok_s"] = PROMPT_LEN_PREFILL / min(times[1:])
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_worker(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", *args], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_round(rounds: list[dict]) -> dict:
    """One engine's rounds as one row: the fastest decode, prefill and load (the host's bandwidth swings
    between processes), the largest RSS (what memory must allow)."""
    return {"decode_tok_s": max(r["decode_tok_s"] for r in rounds),
            "prefill_tok_s": max(r["prefill_tok_s"] for r in rounds),
            "load_s": min(r["load_s"] for r in rounds),
            "load_peak_rss_mb": max(r["load_peak_rss_mb"] for r in rounds),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds)}


def run_pair(ours: list[str], theirs: list[str] | None, rounds: int) -> tuple[dict, dict | None]:
    """Our best round and, with `theirs`, llama.cpp's: worker args run alternating, ours first in even rounds
    and theirs first in odd ones."""
    workers = [("ours", ours)] + ([("theirs", theirs)] if theirs else [])
    runs: dict[str, list[dict]] = {"ours": [], "theirs": []}
    for i in range(rounds):
        for who, args in workers if i % 2 == 0 else workers[::-1]:
            runs[who].append(run_worker(*args))
    return best_round(runs["ours"]), best_round(runs["theirs"]) if theirs else None


# ---- matrices: kernels and weight error --------------------------------------------------------

def layer0(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    out = {}
    for kind in LAYER_KINDS:
        name = next(n for n in weight_map if n.startswith("model.layers.0.") and n.endswith(f".{kind}.weight"))
        with safe_open(os.path.join(model_dir, weight_map[name]), "pt") as f:
            out[kind] = f.get_tensor(name)
    return out


def rope_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf's reordering of q and k rows (Hugging Face's rotate-half to llama.cpp's pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def weight_errors(model_dir: str, gguf_paths: dict[str, str] | None) -> list[tuple[str, str, float]]:
    import numpy as np

    from mistral_grpc import ops

    source = layer0(model_dir)
    rows = []
    for scheme, group in (("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)):
        for kind, w in source.items():
            deq = ops.unpack_linear_weight(ops.quantize_linear_weight(w, scheme, group))
            rows.append((f"ours {scheme}" + (f" g{group}" if group else ""), kind,
                         ((deq - w.float()).norm() / w.float().norm()).item()))
    if gguf_paths:
        import gguf

        heads = {"q_proj": GEOMETRY["num_attention_heads"], "k_proj": GEOMETRY["num_key_value_heads"]}
        for t in ("q8_0", "q4_k_m"):
            tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(gguf_paths[t]).tensors}
            for kind, w in source.items():
                tensor = tensors[f"blk.0.{GGUF_NAMES[kind]}.weight"]
                deq = torch.from_numpy(np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type),
                                                  dtype=np.float32)).reshape(w.shape)
                ref = rope_permute(w.float(), heads[kind]) if kind in heads else w.float()
                rows.append((f"llama.cpp {t} ({tensor.tensor_type.name})", kind,
                             ((deq - ref).norm() / ref.norm()).item()))
    return rows


def kernel_rates(model_dir: str) -> list[tuple[str, float]]:
    """GB/s-equivalent of one layer's seven matrices at batch 1: ours vs torch's weight-only kernels."""
    from mistral_grpc import ops

    source = layer0(model_dir)
    x = {k: torch.randn(1, w.shape[1], dtype=torch.bfloat16) for k, w in source.items()}

    def timed(calls) -> float:
        for call in calls:
            call()
        best = 1e9
        for _ in range(5):
            begin = time.perf_counter()
            for call in calls:
                call()
            best = min(best, time.perf_counter() - begin)
        return best

    bf16_bytes = sum(w.numel() * 2 for w in source.values())
    rates = []
    for scheme in ("int8", "int4"):
        packs = {k: ops.quantize_linear_weight(w, scheme) for k, w in source.items()}
        outs = {k: torch.empty(1, w.shape[0], dtype=torch.bfloat16) for k, w in source.items()}
        seconds = timed([lambda k=k: ops.linear(outs[k], x[k], packs[k]) for k in source])
        rates.append((f"ours {scheme}", bf16_bytes / 2 / seconds / 1e9))
    int8 = {k: (torch.clamp(torch.round(w.float() / (w.float().abs().amax(1, keepdim=True) / 127)), -127, 127)
                .to(torch.int8), (w.float().abs().amax(1) / 127).to(torch.bfloat16)) for k, w in source.items()}
    seconds = timed([lambda k=k: torch.ops.aten._weight_int8pack_mm(x[k], *int8[k]) for k in source])
    rates.append(("torch _weight_int8pack_mm", bf16_bytes / 2 / seconds / 1e9))
    int4 = {}
    for k, w in source.items():
        groups = w.float().reshape(w.shape[0], -1, 32)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-6)
        q = torch.clamp(torch.round((groups - low.unsqueeze(-1)) / scale.unsqueeze(-1)), 0, 15).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(w.shape[0], -1), 8)
        scales_zeros = torch.stack([scale, low + 8 * scale], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        int4[k] = (packed, scales_zeros)
    seconds = timed([lambda k=k: torch.ops.aten._weight_int4pack_mm_for_cpu(x[k], int4[k][0], 32, int4[k][1])
                     for k in source])
    rates.append(("torch _weight_int4pack_mm_for_cpu", bf16_bytes / 4 / seconds / 1e9))
    return rates


# ---- driver ----------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/mistral-grpc-bench"))
    parser.add_argument("--skip-llama", action="store_true", help="ours only (no llama-cpp-python installed)")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "ARG"))
    parser.add_argument("--model-dir")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each engine per scheme, alternating")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.worker:
        kind, arg = args.worker
        print(json.dumps(worker_llama(arg) if kind == "llama" else worker_ours(args.model_dir, arg)))
        return

    model_dir = os.path.join(args.cache_dir, "mistral-7b-random-bf16")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        build_model(model_dir)
    gguf_paths = None if args.skip_llama else build_gguf(args.cache_dir, model_dir)

    print(f"{'scheme':8} {'':10} {'decode tok/s':>13} {'prefill tok/s':>14} {'load s':>7} {'load RSS MB':>12} "
          f"{'peak RSS MB':>12}")
    for ours_scheme, llama_type in PAIRS:
        ours, theirs = run_pair(["ours", ours_scheme, "--model-dir", model_dir],
                                ["llama", gguf_paths[llama_type]] if gguf_paths else None, args.rounds)
        for name, r in [(f"ours {ours_scheme}", ours)] + ([(f"llama {llama_type}", theirs)] if theirs else []):
            print(f"{name:19} {r['decode_tok_s']:13.2f} {r['prefill_tok_s']:14.1f} {r['load_s']:7.1f} "
                  f"{r['load_peak_rss_mb']:12.0f} {r['peak_rss_mb']:12.0f}")
        if theirs:
            print(f"{'  ratio':19} {ours['decode_tok_s'] / theirs['decode_tok_s']:12.2f}x "
                  f"{ours['prefill_tok_s'] / theirs['prefill_tok_s']:13.2f}x")

    print("\nweight error (relative Frobenius norm vs the bf16 source, layer 0):")
    errors = weight_errors(model_dir, gguf_paths)
    for who in dict.fromkeys(w for w, _, _ in errors):
        cells = " ".join(f"{kind}={e:.4f}" for w, kind, e in errors if w == who)
        print(f"  {who:34} {cells}")
    print("\none layer's matrices at batch 1 (bf16 activations), weight GB/s at the scheme's nominal size:")
    for who, rate in kernel_rates(model_dir):
        print(f"  {who:34} {rate:6.1f}")


if __name__ == "__main__":
    main()
