"""How fast the CPU linear kernels stream weights, next to torch, against the machine's read bandwidth.

A batch-1 decode step is the weights streaming through the cores once, so the figure of merit is
GB/s of weight read per call, as a fraction of the best read bandwidth the extension itself
measures (ops.read_bandwidth over a 1 GiB buffer, both cores). Each kernel rotates through copies
of its weight that together exceed the last-level cache (--working-set-mib), so every call
reads from DRAM as in a real model; the time of a call is the best over all calls (the cores are
shared, and a call that lost its core to another process says nothing about the kernel).

    python benchmarks/bench_linear.py              # batch-1 table (Mistral geometry scaled to 175M)
    python benchmarks/bench_linear.py --batches    # + batch sweep: ours vs torch, the crossover
"""

import argparse
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mistral_grpc import ops

# (name, N, K): hidden 1024, 32 query heads of 32 -> 8 kv heads, intermediate 3584, vocab 32000.
SHAPES = [("qkv", 1536, 1024), ("o_proj", 1024, 1024), ("gate_up+silu", 2 * 3584, 1024),
          ("down", 1024, 3584), ("lm_head", 32000, 1024)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
SLICE_BYTES = 16 << 20  # read-bandwidth slices: the size of a typical weight


def best_call_seconds(call: Callable[[torch.Tensor], object], weights: list[torch.Tensor], rounds: int) -> float:
    best = math.inf
    for _ in range(rounds):
        for w in weights:
            start = time.perf_counter()
            call(w)
            best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(working_set: int, rounds: int) -> tuple[float, float]:
    """(whole buffer, best 16 MiB slice) GB/s of the extension's own read loop."""
    buffer = torch.ones(working_set // 4)
    whole = ops.read_bandwidth(buffer, rounds)
    slices = buffer.split(SLICE_BYTES // 4)
    best_slice = max(ops.read_bandwidth(s, 1) for _ in range(rounds) for s in slices)
    return whole, best_slice


def copies_of(t: torch.Tensor, working_set: int) -> list[torch.Tensor]:
    return [t.clone() for _ in range(max(1, math.ceil(working_set / t.nbytes)))]


def batch1_row(name: str, n: int, k: int, dtype: torch.dtype, working_set: int, rounds: int) -> tuple[float, float]:
    """(ours, torch) weight GB/s at batch 1, each streaming its own copies of the weight."""
    x = torch.randn(1, k, dtype=dtype)
    weight = torch.randn(n, k, dtype=dtype) / math.sqrt(k)
    if name.startswith("gate_up"):
        f = n // 2
        out = torch.empty(1, f, dtype=dtype)
        packed = copies_of(ops.pack_gate_up_weight(weight[:f], weight[f:]), working_set)
        ours = best_call_seconds(lambda p: ops.linear_silu_mul(out, x, p), packed, rounds)
        del packed
        plain = copies_of(weight, working_set)
        theirs = best_call_seconds(lambda w: _torch_silu_mul(F.linear(x, w), f), plain, rounds)
    else:
        out = torch.empty(1, n, dtype=dtype)
        packed = copies_of(ops.pack_linear_weight(weight), working_set)
        ours = best_call_seconds(lambda p: ops.linear(out, x, p), packed, rounds)
        del packed
        plain = copies_of(weight, working_set)
        theirs = best_call_seconds(lambda w: F.linear(x, w), plain, rounds)
    return weight.nbytes / ours / 1e9, weight.nbytes / theirs / 1e9


def _torch_silu_mul(gate_up: torch.Tensor, f: int) -> torch.Tensor:
    return F.silu(gate_up[:, :f]) * gate_up[:, f:]


def batch_sweep(n: int, k: int, dtype: torch.dtype, rounds: int) -> None:
    """Ours vs torch on one (cache-warm) weight as the batch grows: where prefill should go to torch.
    For bf16, torch's path from a packed weight is unpack + F.linear, so that is timed too."""
    weight = torch.randn(n, k, dtype=dtype) / math.sqrt(k)
    packed = ops.pack_linear_weight(weight)
    for t in BATCHES:
        x = torch.randn(t, k, dtype=dtype)
        out = torch.empty(t, n, dtype=dtype)
        reps = [packed] * max(3, rounds * 4)
        ours = best_call_seconds(lambda p: ops.linear(out, x, p), reps, 1)
        theirs = best_call_seconds(lambda w: F.linear(x, w), [weight] * len(reps), 1)
        via_unpack = best_call_seconds(lambda p: F.linear(x, ops.unpack_linear_weight(p)), reps[:3], 1)
        flops = 2 * t * n * k
        print(f"{t:>5} {ours * 1e3:>9.3f} {flops / ours / 1e9:>8.0f} {theirs * 1e3:>9.3f} {flops / theirs / 1e9:>8.0f} "
              f"{via_unpack * 1e3:>11.3f} {theirs / ours:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--working-set-mib", type=int, default=1024,
                        help="bytes each kernel rotates through per round; above the L3 so calls read DRAM")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", action="store_true", help="also sweep the batch size (ours vs torch)")
    args = parser.parse_args()
    working_set = args.working_set_mib << 20
    torch.manual_seed(0)

    whole, best_slice = read_bandwidth(working_set, args.rounds)
    print(f"CPU linear kernels: {ops.linear_cpu_isa()}, {torch.get_num_threads()} threads")
    print(f"read bandwidth (ops.read_bandwidth, {args.working_set_mib} MiB): whole buffer {whole:.1f} GB/s, "
          f"best 16 MiB slice {best_slice:.1f} GB/s (the reference below)")
    print()
    print(f"{'shape':<13} {'dtype':<5} {'N':>6} {'K':>5} {'MiB':>6} {'ours GB/s':>10} {'% of read':>9} "
          f"{'torch GB/s':>10} {'speedup':>7}")
    for dtype_name, dtype in DTYPES.items():
        for name, n, k in SHAPES:
            ours, theirs = batch1_row(name, n, k, dtype, working_set, args.rounds)
            mib = n * k * dtype.itemsize / (1 << 20)
            print(f"{name:<13} {dtype_name:<5} {n:>6} {k:>5} {mib:>6.1f} {ours:>10.1f} {100 * ours / best_slice:>8.0f}% "
                  f"{theirs:>10.1f} {ours / theirs:>6.1f}x")

    if args.batches:
        for dtype_name, dtype in DTYPES.items():
            n, k = 7168, 1024
            print(f"\nbatch sweep, {dtype_name} [{n}, {k}] (warm weight): ms per call and GFLOP/s")
            print(f"{'T':>5} {'ours ms':>9} {'GFLOP/s':>8} {'torch ms':>9} {'GFLOP/s':>8} {'unpack+F ms':>11} "
                  f"{'speedup':>7}")
            batch_sweep(n, k, dtype, args.rounds)


if __name__ == "__main__":
    main()
