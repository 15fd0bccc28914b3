"""How fast the CPU linear kernels stream weights, next to torch, against the machine's read bandwidth.

A batch-1 decode step is the weights streaming through the cores once, so the figure of merit is
GB/s of weight read per call, as a fraction of the best read bandwidth the extension itself
measures (ops.read_bandwidth, both cores, over a 1 GiB buffer). Each kernel rotates through
copies of its weight that together fill the working set (--working-set-mib), so every call reads
cold memory as in a real model. Timings are the best call of all: the cores are shared, and a
call that lost a core to another process says nothing about the kernel. A longer call is more
likely to lose one, so each row's reference is the best read of the same number of bytes (the
weight's own copies, read with the kernels' load loop). The read is timed inside the op, the
kernels from Python, so the ratio leans a little towards the read.

    python benchmarks/bench_linear.py              # batch-1 table (Mistral geometry scaled to 175M)
    python benchmarks/bench_linear.py --batches    # + batch sweep: ours (AMX, vector) vs torch
"""

import argparse
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mistral_grpc import ops
from mistral_grpc.memory import zeros_on_huge_pages

# (name, N, K): hidden 1024, 32 query heads of 32 -> 8 kv heads, intermediate 3584, vocab 32000.
SHAPES = [("qkv", 1536, 1024), ("o_proj", 1024, 1024), ("gate_up+silu", 2 * 3584, 1024),
          ("down", 1024, 3584), ("lm_head", 32000, 1024)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BATCHES = [1, 2, 4, 5, 6, 8, 16, 32, 64, 128, 256, 512]


def best_call_seconds(call: Callable[[torch.Tensor], object], weights: list[torch.Tensor], rounds: int) -> float:
    best = math.inf
    for _ in range(rounds):
        for w in weights:
            start = time.perf_counter()
            call(w)
            best = min(best, time.perf_counter() - start)
    return best


def best_read(buffer: torch.Tensor, nbytes: int, rounds: int) -> float:
    """Best GB/s of the extension's read loop over nbytes-long slices of the buffer."""
    slices = buffer.view(torch.uint8).split(nbytes)
    return max(ops.read_bandwidth(s, 1) for _ in range(rounds) for s in slices if s.numel() == nbytes)


def copies_of(t: torch.Tensor, working_set: int) -> list[torch.Tensor]:
    return [t.clone() for _ in range(max(2, math.ceil(working_set / t.nbytes)))]


def batch1_row(name: str, n: int, k: int, dtype: torch.dtype, working_set: int, rounds: int) -> tuple[float, ...]:
    """(read, ours, torch) GB/s at batch 1 for one weight. The three take turns call by call, each on
    a copy untouched since the previous round, so all see the same neighbours on the cores."""
    x = torch.randn(1, k, dtype=dtype)
    weight = torch.randn(n, k, dtype=dtype) / math.sqrt(k)
    gate_up = name.startswith("gate_up")
    f = n // 2
    out = torch.empty(1, f if gate_up else n, dtype=dtype)

    def ours_call(packed_weight: torch.Tensor) -> None:
        (ops.linear_silu_mul if gate_up else ops.linear)(out, x, packed_weight)

    def torch_call(w: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, w)
        return F.silu(y[:, :f]) * y[:, f:] if gate_up else y

    packed = copies_of(ops.pack_gate_up_weight(weight[:f], weight[f:]) if gate_up else ops.pack_linear_weight(weight),
                       working_set)
    plain = copies_of(weight, working_set)
    count = min(len(packed), len(plain))
    read, ours, theirs = 0.0, math.inf, math.inf
    for _ in range(max(rounds, math.ceil(100 / count))):  # at least 100 calls each
        for i in range(count):
            read = max(read, ops.read_bandwidth(packed[(i + count // 2) % count], 1))
            ours = min(ours, best_call_seconds(ours_call, [packed[i]], 1))
            theirs = min(theirs, best_call_seconds(torch_call, [plain[i]], 1))
    return read, weight.nbytes / ours / 1e9, weight.nbytes / theirs / 1e9


def batch_sweep(n: int, k: int, dtype: torch.dtype, rounds: int) -> None:
    """GFLOP/s of ours and torch on one (cache-warm) weight as the batch grows: where our ops should
    switch kernels (AMX for bf16 from kAmxMinRows in cpu/linear.cpp) and whether torch ever wins."""
    levels = [ops.linear_cpu_isa()]
    if levels[0] == "amx" and dtype == torch.bfloat16:
        levels.append("avx512_bf16")
    print(f"\nbatch sweep, {str(dtype).removeprefix('torch.')} [{n}, {k}], weight warm: GFLOP/s")
    print(f"{'T':>5} " + " ".join(f"{level:>11}" for level in levels) + f" {'torch':>8} {'ours/torch':>10}")
    weight = torch.randn(n, k, dtype=dtype) / math.sqrt(k)
    packed = ops.pack_linear_weight(weight)
    calls = max(10, 8 * rounds)
    for t in BATCHES:
        x = torch.randn(t, k, dtype=dtype)
        out = torch.empty(t, n, dtype=dtype)
        flops = 2 * t * n * k
        ours = []
        for level in levels:
            ops.linear_cpu_isa(level)
            ours.append(flops / best_call_seconds(lambda p: ops.linear(out, x, p), [packed] * calls, 1) / 1e9)
        ops.linear_cpu_isa(levels[0])
        theirs = flops / best_call_seconds(lambda w: F.linear(x, w), [weight] * calls, 1) / 1e9
        print(f"{t:>5} " + " ".join(f"{g:>11.0f}" for g in ours) + f" {theirs:>8.0f} {ours[0] / theirs:>9.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--working-set-mib", type=int, default=1024,
                        help="bytes each kernel rotates through per round; above the L3 so calls read DRAM")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", action="store_true", help="also sweep the batch size (ours vs torch)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads (all cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    working_set = args.working_set_mib << 20
    torch.manual_seed(0)

    buffer = zeros_on_huge_pages((working_set // 4,), torch.float32).fill_(1)  # as the packed weights lie
    whole = ops.read_bandwidth(buffer, args.rounds)
    best_slice = best_read(buffer, 16 << 20, args.rounds)
    del buffer
    print(f"CPU linear kernels: {ops.linear_cpu_isa()}, {torch.get_num_threads()} threads")
    print(f"read bandwidth (ops.read_bandwidth): {args.working_set_mib} MiB in one go {whole:.1f} GB/s, "
          f"best 16 MiB slice of it {best_slice:.1f} GB/s")
    print()
    print(f"{'shape':<13} {'dtype':<5} {'N':>6} {'K':>5} {'MiB':>6} {'read GB/s':>9} {'ours GB/s':>9} {'% of read':>9} "
          f"{'torch GB/s':>10} {'speedup':>7}")
    for dtype_name, dtype in DTYPES.items():
        for name, n, k in SHAPES:
            read, ours, theirs = batch1_row(name, n, k, dtype, working_set, args.rounds)
            mib = n * k * dtype.itemsize / (1 << 20)
            print(f"{name:<13} {dtype_name:<5} {n:>6} {k:>5} {mib:>6.1f} {read:>9.1f} {ours:>9.1f} "
                  f"{100 * ours / read:>8.0f}% {theirs:>10.1f} {ours / theirs:>6.1f}x")

    if args.batches:
        for dtype in DTYPES.values():
            for _, n, k in SHAPES[2:4]:
                batch_sweep(n, k, dtype, args.rounds)


if __name__ == "__main__":
    main()
