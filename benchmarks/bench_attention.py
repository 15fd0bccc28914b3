"""CPU paged_attention: the extension's kernel against plain torch on the same paged cache.

Two baselines, each timed with its gather from the block table included:
  gather+softmax  tests/ops/reference.py (gather each sequence's K/V, masked softmax in fp32)
  gather+sdpa     gather into contiguous [Hkv, S, D] tensors, then torch's scaled_dot_product_attention
ratio = baseline time / kernel time (above 1: the kernel is faster). Decode rows also report the
KV-cache bytes the kernel streams per second.

    PYTHONPATH=python python benchmarks/bench_attention.py [--dtype float32 bfloat16] [--threads N]

On a machine shared with other work, --threads 1 gives the steadiest numbers: with more threads
every call waits for whichever thread the scheduler has set aside.
"""

import argparse
import math
import pathlib
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "ops"))
import reference  # noqa: E402

from mistral_grpc import ops  # noqa: E402

BLOCK_SIZE = 16
# (kind, sequences, context tokens per sequence)
CASES = [("decode", 1, 512), ("decode", 1, 2048), ("decode", 16, 512), ("decode", 16, 2048), ("prefill", 1, 512)]
# (q heads, kv heads, head dim): Mistral 7B and the small test geometry
GEOMETRIES = [(32, 8, 128), (8, 2, 128)]


def make_batch(kind: str, num_seqs: int, context: int, q_heads: int, kv_heads: int, head_dim: int,
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
    blocks_per_seq = math.ceil(context / BLOCK_SIZE)
    num_blocks = num_seqs * blocks_per_seq
    q_len = 1 if kind == "decode" else context
    cache_shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    return {
        "q": torch.randn(num_seqs * q_len, q_heads, head_dim).to(dtype),
        "k_cache": torch.randn(cache_shape).to(dtype),
        "v_cache": torch.randn(cache_shape).to(dtype),
        "block_tables": torch.randperm(num_blocks).int().view(num_seqs, blocks_per_seq),
        "seq_lens": torch.full((num_seqs,), context, dtype=torch.int32),
        "query_start_loc": (torch.arange(num_seqs + 1) * q_len).int(),
    }


def run_kernel(b: dict[str, torch.Tensor], out: torch.Tensor, scale: float) -> None:
    ops.paged_attention(out, b["q"], b["k_cache"], b["v_cache"], b["block_tables"], b["seq_lens"],
                        b["query_start_loc"], scale, 0)


def run_gather_softmax(b: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    return reference.paged_attention(b["q"], b["k_cache"], b["v_cache"], b["block_tables"], b["seq_lens"],
                                     b["query_start_loc"], scale, 0)


def run_gather_sdpa(b: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    out = torch.empty_like(b["q"])
    for s in range(b["seq_lens"].numel()):
        start, end = int(b["query_start_loc"][s]), int(b["query_start_loc"][s + 1])
        seq_len, q_len = int(b["seq_lens"][s]), end - start
        blocks = b["block_tables"][s, : math.ceil(seq_len / BLOCK_SIZE)].long()
        # [blocks, block_size, Hkv, D] -> [Hkv, S, D]
        k = b["k_cache"][blocks].flatten(0, 1)[:seq_len].transpose(0, 1)
        v = b["v_cache"][blocks].flatten(0, 1)[:seq_len].transpose(0, 1)
        q = b["q"][start:end].transpose(0, 1)
        # Queries are the last q_len positions: causal against the cache means a bottom-right mask.
        mask = None
        if q_len > 1:
            mask = torch.ones(q_len, seq_len, dtype=torch.bool).tril(diagonal=seq_len - q_len)
        out[start:end] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                        enable_gqa=True).transpose(0, 1)
    return out


def best_ms(fn: Callable[[], object], min_runs: int = 5, min_seconds: float = 1.0, max_runs: int = 1000) -> float:
    """The fastest of repeated runs: on a shared machine the slower ones measure the neighbours."""
    fn()  # warm up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_seconds and len(times) < max_runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads={args.threads} block_size={BLOCK_SIZE} cpu={torch.backends.cpu.get_cpu_capability()}")
    print("| case | heads q/kv/D | dtype | kernel ms | KV GB/s | gather+softmax ms | ratio | gather+sdpa ms | ratio |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for q_heads, kv_heads, head_dim in GEOMETRIES:
            for kind, num_seqs, context in CASES:
                b = make_batch(kind, num_seqs, context, q_heads, kv_heads, head_dim, dtype)
                scale = head_dim**-0.5
                out = torch.empty_like(b["q"])
                kernel = best_ms(lambda: run_kernel(b, out, scale))
                softmax = best_ms(lambda: run_gather_softmax(b, scale))
                sdpa = best_ms(lambda: run_gather_sdpa(b, scale))
                torch.testing.assert_close(out, run_gather_sdpa(b, scale), atol=2e-2, rtol=2e-2)
                kv_bytes = 2 * b["k_cache"].numel() * b["k_cache"].element_size()
                bandwidth = f"{kv_bytes / kernel / 1e6:.1f}" if kind == "decode" else "-"
                name = f"{kind} {num_seqs}x{context}"
                print(f"| {name} | {q_heads}/{kv_heads}/{head_dim} | {dtype_name} | {kernel:.3f} | {bandwidth} | "
                      f"{softmax:.3f} | {softmax / kernel:.1f}x | {sdpa:.3f} | {sdpa / kernel:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
