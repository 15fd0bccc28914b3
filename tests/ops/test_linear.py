"""CPU linear ops (pack_linear_weight, linear, linear_silu_mul, ...) against torch.nn.functional.linear.

Every kernel level the CPU has (portable, avx2, avx512, avx512_bf16, amx) runs the same cases:
shapes whose N and K are not multiples of the 16-wide tile or the bf16 pair, and batches 1..33,
which cross the register blocks (2 to 6 rows; 16 and 32 for AMX) and their remainders; fp32
batches of prefill size too (AMX from 80 rows).
"""

import os
import sys
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from mistral_grpc import ops
from mistral_grpc.memory import zeros_on_huge_pages
from mistral_grpc.model.linear import GateUpSilu, Linear

LEVELS = ["portable", "avx2", "avx512", "avx512_bf16", "amx"]
DTYPES = [torch.float32, torch.bfloat16]
# (N, K): tails in both dimensions, a single row/column, exact multiples, (300, 520): big enough
# to be split across threads, with tile groups cut at the split, and K % 32 == 0 for AMX (bf16
# batches of 7 rows and more) with an odd number of 16-output tiles; (40, 777): several K chunks
# for batches of 2-4 row blocks, the last chunk ending on bf16's odd-K pair.
SHAPES = [(1, 1), (17, 5), (33, 31), (100, 257), (48, 64), (300, 520), (45, 96), (150, 256), (40, 777)]
# 7-48 rows: 2-8 row blocks over chunked K; 49: past them. 31-33: AMX's 32-row blocks.
BATCHES = [*range(1, 10), 13, 20, 31, 32, 33, 48, 49]


def supported_levels() -> list[str]:
    best = ops.linear_cpu_isa("best")
    return LEVELS[: LEVELS.index(best) + 1]


@pytest.fixture(params=supported_levels())
def level(request: pytest.FixtureRequest) -> Iterator[str]:
    ops.linear_cpu_isa(request.param)
    yield request.param
    ops.linear_cpu_isa("best")


def assert_close(out: torch.Tensor, reference: torch.Tensor) -> None:
    """out (fp32 or bf16) against a fp32 reference: fp32 accumulation in another order, plus at most
    one rounding to bf16."""
    tol = 1e-4 if out.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), reference, atol=tol, rtol=tol)


def random_weight(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(n, k) / k**0.5).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_matches_torch(level: str, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    n, k = shape
    weight = random_weight(n, k, dtype)
    packed = ops.pack_linear_weight(weight)
    for t in BATCHES:
        x = torch.randn(t, k).to(dtype)
        out = torch.empty(t, n, dtype=dtype)
        ops.linear(out, x, packed)
        assert_close(out, F.linear(x.float(), weight.float()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_silu_mul_matches_torch(level: str, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    f, k = shape
    gate, up = random_weight(f, k, dtype), random_weight(f, k, dtype)
    packed = ops.pack_gate_up_weight(gate, up)
    for t in BATCHES:
        x = torch.randn(t, k).to(dtype)
        out = torch.empty(t, f, dtype=dtype)
        ops.linear_silu_mul(out, x, packed)
        # gate and up as F.linear returns them in the weights' dtype, then silu(gate) * up in fp32.
        g = F.linear(x.float(), gate.float()).to(dtype).float()
        u = F.linear(x.float(), up.float()).to(dtype).float()
        assert_close(out, F.silu(g) * u)


# fp32 batches of 80 rows and more (prefill chunks) run on AMX where the CPU has it: x and the weights
# split exactly into three bf16 parts each. 95: a partial 16-row block; K = 160: a partial chunk of K
# (4 x 32); K = 31: not a whole 32-K block, so the vector kernels even at the amx level.
FP32_PREFILL_BATCHES = [80, 95, 130]


@pytest.mark.parametrize("shape", [(48, 64), (45, 96), (150, 256), (17, 160), (33, 31)])
def test_fp32_prefill_batches_are_as_accurate_as_fma(level: str, shape: tuple[int, int]) -> None:
    """Against an fp64 reference at fp32's own accuracy, x a column slice of a NaN-padded buffer and
    out a slice of a wider one, for linear and linear_silu_mul."""
    n, k = shape
    weight, gate, up = (random_weight(n, k, torch.float32) for _ in range(3))
    packed, gate_up = ops.pack_linear_weight(weight), ops.pack_gate_up_weight(gate, up)
    for t in FP32_PREFILL_BATCHES:
        wide_x = torch.full((t, k + 7), float("nan"))
        x = wide_x[:, 3 : 3 + k]
        x.copy_(torch.randn(t, k))
        wide_out = torch.zeros(t, n + 5)
        out = wide_out[:, 2 : 2 + n]
        ops.linear(out, x, packed)
        torch.testing.assert_close(out.double(), x.double() @ weight.double().T, atol=2e-5, rtol=2e-5)
        assert not wide_out[:, :2].any() and not wide_out[:, 2 + n :].any()
        ops.linear_silu_mul(out, x, gate_up)
        assert_close(out, F.silu(F.linear(x, gate)) * F.linear(x, up))


@pytest.mark.parametrize("n", [40, 1])
def test_fp32_prefill_batch_with_long_k(level: str, n: int) -> None:
    """K long enough that x's parts take more than 3 MB (AMX then folds K in segments, carrying the
    sums from one to the next; the last segment ends in a partial chunk), against fp64. N = 40: an odd
    number of tiles, so the last linear item has one; N = 1: a single tile."""
    t, k = 96, 8352
    weight, gate, up = (random_weight(n, k, torch.float32) for _ in range(3))
    x = torch.randn(t, k)
    out = torch.empty(t, n)
    ops.linear(out, x, ops.pack_linear_weight(weight))
    torch.testing.assert_close(out.double(), x.double() @ weight.double().T, atol=4e-5, rtol=2e-5)
    ops.linear_silu_mul(out, x, ops.pack_gate_up_weight(gate, up))
    assert_close(out, F.silu(F.linear(x, gate)) * F.linear(x, up))


def test_long_k_large_batch(level: str) -> None:
    """Tiles too long to re-read side by side from L2 for each row block go one at a time."""
    weight, gate, up = (random_weight(64, 4200, torch.float32) for _ in range(3))
    x = torch.randn(13, 4200)
    out = torch.empty(13, 64)
    ops.linear(out, x, ops.pack_linear_weight(weight))
    assert_close(out, F.linear(x, weight))
    ops.linear_silu_mul(out, x, ops.pack_gate_up_weight(gate, up))
    assert_close(out, F.silu(F.linear(x, gate)) * F.linear(x, up))


# Batches that cross every blocking: 1-6 rows (one register block), 7-48 (chunked K over 2-8 blocks),
# 49 (whole K per block), 7-16 and 17+ (AMX's 16- and 32-row kernels), 80+ (fp32 AMX by size).
SIDE_BATCHES = [1, 2, 5, 6, 7, 13, 16, 17, 33, 48, 49, 80, 95]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(300, 520), (40, 777)])
@pytest.mark.parametrize("gate_up", [False, True], ids=["linear", "silu_mul"])
def test_a_rows_result_depends_on_its_side_only(level: str, dtype: torch.dtype, shape: tuple[int, int],
                                                gate_up: bool) -> None:
    """With prompt_rows >= 0 a row's output is bit for bit the same in every batch: alone, among more
    prompt rows or more decode rows, or after any number of the other side's (the engine's seeds rely
    on it). By the batch's size (prompt_rows -1) the kernels, and so the rounding, may differ."""
    n, k = shape
    if gate_up:
        gate, up = random_weight(n, k, dtype), random_weight(n, k, dtype)
        packed, op = ops.pack_gate_up_weight(gate, up), ops.linear_silu_mul
    else:
        packed, op = ops.pack_linear_weight(random_weight(n, k, dtype)), ops.linear
    x = torch.randn(max(SIDE_BATCHES), k).to(dtype)

    def run(rows: torch.Tensor, prompt_rows: int) -> torch.Tensor:
        out = torch.empty(rows.shape[0], n, dtype=dtype)
        op(out, rows, packed, prompt_rows)
        return out

    alone = {side: torch.cat([run(x[i : i + 1], side) for i in range(x.shape[0])]) for side in (0, 1)}
    for t in SIDE_BATCHES:
        assert torch.equal(run(x[:t], 0), alone[0][:t]), f"{t} decode rows"
        assert torch.equal(run(x[:t], t), alone[1][:t]), f"{t} prompt rows"
        for p in {1, t // 2, t - 1} - {0}:
            mixed = run(x[:t], p)
            assert torch.equal(mixed[:p], alone[1][:p]) and torch.equal(mixed[p:], alone[0][p:t]), f"{p} of {t}"


def test_prompt_rows_out_of_range_is_an_error(packed_fp32: torch.Tensor) -> None:
    x, out = torch.randn(3, 32), torch.zeros(3, 16)
    for bad in (-2, 4):
        with pytest.raises(RuntimeError, match="prompt_rows must be -1 or in"):
            ops.linear(out, x, packed_fp32, bad)
    assert not out.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("t", "k"), [(9, 71), (32, 96)])
def test_linear_reads_and_writes_strided_rows(dtype: torch.dtype, t: int, k: int) -> None:
    """x may be a column slice of a wider buffer, out a column slice of one (e.g. q of a qkv buffer).
    With K odd, the bf16 kernels must not pair x[K - 1] with the NaN that follows it; AMX reads
    32 whole rows of x in place."""
    n = 40
    weight = random_weight(n, k, dtype)
    wide_x = torch.full((t, k + 13), float("nan"), dtype=dtype)
    x = wide_x[:, 5 : 5 + k]
    x.copy_(torch.randn(t, k))
    wide_out = torch.zeros(t, n + 24, dtype=dtype)
    out = wide_out[:, 8 : 8 + n]
    ops.linear(out, x, ops.pack_linear_weight(weight))
    assert_close(out, F.linear(x.float(), weight.float()))
    assert not wide_out[:, :8].any() and not wide_out[:, 8 + n :].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_round_trips(dtype: torch.dtype) -> None:
    weight = random_weight(37, 19, dtype)
    assert torch.equal(ops.unpack_linear_weight(ops.pack_linear_weight(weight)), weight)
    gate, up = random_weight(37, 19, dtype), random_weight(37, 19, dtype)
    assert torch.equal(ops.unpack_linear_weight(ops.pack_gate_up_weight(gate, up)), torch.cat([gate, up]))


def test_pack_accepts_non_contiguous_weight() -> None:
    weight = random_weight(24, 40, torch.float32)
    assert torch.equal(ops.unpack_linear_weight(ops.pack_linear_weight(weight.t().contiguous().t())), weight)


def test_empty_batch_is_a_no_op() -> None:
    packed = ops.pack_linear_weight(random_weight(8, 8, torch.float32))
    ops.linear(torch.empty(0, 8), torch.empty(0, 8), packed)


def test_linear_opcheck() -> None:
    weight = random_weight(20, 33, torch.float32)
    x = torch.randn(3, 33)
    torch.library.opcheck(torch.ops.mistral_grpc.pack_linear_weight, (weight,))
    torch.library.opcheck(torch.ops.mistral_grpc.linear, (torch.empty(3, 20), x, ops.pack_linear_weight(weight)))
    # A prefill-size fp32 batch (AMX where the CPU has it).
    weight = random_weight(20, 64, torch.float32)
    torch.library.opcheck(torch.ops.mistral_grpc.linear,
                          (torch.empty(96, 20), torch.randn(96, 64), ops.pack_linear_weight(weight)))


def test_linear_silu_mul_opcheck() -> None:
    gate, up = random_weight(20, 33, torch.bfloat16), random_weight(20, 33, torch.bfloat16)
    x = torch.randn(3, 33).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.mistral_grpc.pack_gate_up_weight, (gate, up))
    packed = ops.pack_gate_up_weight(gate, up)
    torch.library.opcheck(torch.ops.mistral_grpc.linear_silu_mul, (torch.empty(3, 20, dtype=torch.bfloat16), x, packed))


def test_read_bandwidth_is_positive() -> None:
    assert ops.read_bandwidth(torch.ones(1 << 16), 2) > 0


# ---- misuse is a clear error ----------------------------------------------------------------


@pytest.fixture
def packed_fp32() -> torch.Tensor:
    return ops.pack_linear_weight(random_weight(16, 32, torch.float32))


def test_linear_rejects_wrong_k(packed_fp32: torch.Tensor) -> None:
    with pytest.raises(RuntimeError, match=r"x must be \[T, 32\]"):
        ops.linear(torch.empty(2, 16), torch.randn(2, 31), packed_fp32)


def test_linear_rejects_wrong_out_shape(packed_fp32: torch.Tensor) -> None:
    with pytest.raises(RuntimeError, match=r"out must be \[2, 16\]"):
        ops.linear(torch.empty(2, 15), torch.randn(2, 32), packed_fp32)


def test_linear_rejects_dtype_other_than_the_weights(packed_fp32: torch.Tensor) -> None:
    with pytest.raises(RuntimeError, match="x must be Float like the weight"):
        ops.linear(torch.empty(2, 16), torch.randn(2, 32).to(torch.bfloat16), packed_fp32)


def test_linear_rejects_unpacked_weight() -> None:
    with pytest.raises(RuntimeError, match="expected a packed weight"):
        ops.linear(torch.empty(2, 16), torch.randn(2, 32), torch.randn(16, 32))


def test_linear_rejects_bytes_that_are_not_a_packed_weight(packed_fp32: torch.Tensor) -> None:
    with pytest.raises(RuntimeError, match="corrupt"):
        ops.linear(torch.empty(2, 16), torch.randn(2, 32), torch.zeros_like(packed_fp32))
    with pytest.raises(RuntimeError, match="corrupt"):
        ops.linear(torch.empty(2, 16), torch.randn(2, 32), packed_fp32[:-64].clone())


def test_ops_reject_the_other_kind_of_pack(packed_fp32: torch.Tensor) -> None:
    gate_up = ops.pack_gate_up_weight(torch.randn(16, 32), torch.randn(16, 32))
    with pytest.raises(RuntimeError, match="use linear_silu_mul"):
        ops.linear(torch.empty(2, 16), torch.randn(2, 32), gate_up)
    with pytest.raises(RuntimeError, match="use linear"):
        ops.linear_silu_mul(torch.empty(2, 16), torch.randn(2, 32), packed_fp32)


def test_pack_rejects_bad_weights() -> None:
    with pytest.raises(RuntimeError, match=r"non-empty \[N, K\] matrix"):
        ops.pack_linear_weight(torch.randn(4, 4, 4))
    with pytest.raises(RuntimeError, match=r"non-empty \[N, K\] matrix"):
        ops.pack_linear_weight(torch.randn(0, 4))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.pack_linear_weight(torch.randn(4, 4).half())
    with pytest.raises(RuntimeError, match="one shape and dtype"):
        ops.pack_gate_up_weight(torch.randn(4, 8), torch.randn(5, 8))


def test_read_bandwidth_rejects_no_repeats() -> None:
    with pytest.raises(RuntimeError, match="repeats must be >= 1"):
        ops.read_bandwidth(torch.ones(64), 0)


def test_linear_cpu_isa_rejects_unknown_names() -> None:
    with pytest.raises(RuntimeError, match="unknown ISA 'sse9'"):
        ops.linear_cpu_isa("sse9")


# ---- the decoder's wrappers (mistral_grpc.model.linear) ---------------------------------------

WRAPPER_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", WRAPPER_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_linear_matches_torch(device: str, dtype: torch.dtype) -> None:
    weight = random_weight(50, 96, dtype).to(device)
    layer = Linear.from_weight(weight)
    x = torch.randn(2, 7, 96).to(device, dtype)
    expected = F.linear(x.float(), weight.float())
    assert_close(layer(x), expected)
    out = torch.empty(2, 7, 50, dtype=dtype, device=device)
    assert layer(x, out=out) is out
    assert_close(out, expected)


@pytest.mark.parametrize("device", WRAPPER_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_gate_up_silu_matches_torch(device: str, dtype: torch.dtype) -> None:
    gate, up = random_weight(40, 64, dtype).to(device), random_weight(40, 64, dtype).to(device)
    layer = GateUpSilu.from_weights(gate, up)
    x = torch.randn(3, 64).to(device, dtype)
    g = F.linear(x.float(), gate.float()).to(dtype).float()
    u = F.linear(x.float(), up.float()).to(dtype).float()
    assert_close(layer(x), F.silu(g) * u)


def test_packed_linear_rejects_wrong_width() -> None:
    layer = Linear.from_weight(random_weight(8, 16, torch.float32))
    with pytest.raises(ValueError, match=r"expected x \[\.\.\., 16\]"):
        layer(torch.randn(2, 15))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages are Linux's")
def test_large_packed_weights_start_on_a_huge_page_and_round_trip() -> None:
    weight = random_weight(1024, 1024, torch.float32)  # 4 MiB packed
    packed = ops.pack_linear_weight(weight)
    assert packed.data_ptr() % (2 << 20) == 0
    torch.testing.assert_close(ops.unpack_linear_weight(packed), weight, rtol=0, atol=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages are Linux's")
def test_zeros_on_huge_pages_are_aligned_zero_and_writable() -> None:
    kv = zeros_on_huge_pages((300, 16, 2, 128), torch.bfloat16)  # 4.7 MiB, as a KV cache layer is allocated
    assert kv.shape == (300, 16, 2, 128) and kv.dtype == torch.bfloat16
    assert kv.data_ptr() % (2 << 20) == 0 and not kv.any()
    kv[-1] = 1.5
    assert kv.sum().item() == 1.5 * 16 * 2 * 128
    small = zeros_on_huge_pages((3, 5), torch.float32)  # under 2 MiB: ordinary zeros
    assert small.shape == (3, 5) and not small.any()
    assert zeros_on_huge_pages((0, 7), torch.float32).shape == (0, 7)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages are Linux's")
def test_zeros_on_huge_pages_populate_faults_every_page_now() -> None:
    size = 64 << 20  # as the KV cache is allocated: resident from the start, still zero
    before = _resident_bytes()
    lazy = zeros_on_huge_pages((size,), torch.uint8)
    lazy_growth = _resident_bytes() - before
    before = _resident_bytes()
    eager = zeros_on_huge_pages((size // 4,), torch.float32, populate=True)
    eager_growth = _resident_bytes() - before
    assert lazy_growth < size // 4
    assert eager_growth >= size * 0.95
    assert eager.shape == (size // 4,) and eager.data_ptr() % (2 << 20) == 0 and not eager.any()
    del lazy


def test_zeroed_bytes_opcheck_and_rejects_negative() -> None:
    torch.library.opcheck(torch.ops.mistral_grpc.zeroed_bytes, (3 << 20,))
    with pytest.raises(RuntimeError, match="nbytes must be >= 0"):
        ops.zeroed_bytes(-1)
