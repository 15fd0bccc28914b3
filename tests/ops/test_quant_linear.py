"""Quantized CPU linear ops (quantize_linear_weight, quantize_gate_up_weight, and linear / linear_silu_mul /
unpack_linear_weight on their packs) against plain torch.

The reference quantizes x per 32 values as csrc/common/quant.h says and multiplies the dequantized x by
the dequantized weight (unpack_linear_weight) in float64: the kernels add no error beyond those two
roundings. Every kernel level the CPU has runs the same cases, and their dot products agree to the bit;
batches 1..33 cross the register blocks (1-3 rows over 4 streams, up to 12 in one; int4 up to 8).
"""

import pytest
import torch
import torch.nn.functional as F

from mistral_grpc import ops
from test_linear import level, random_weight, supported_levels  # noqa: F401  (level: the fixture)

DTYPES = [torch.float32, torch.bfloat16]
# (scheme, group_size): int8 per channel, int4 in each group size.
SCHEMES = [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)]
# (N, K): N and K off the 16-row tile and the 32-value block, a single row/column, K past one group
# but not a whole number of them; (300, 520) splits across both threads.
SHAPES = [(1, 1), (17, 5), (37, 200), (48, 64), (300, 520), (64, 1000)]
BATCHES = [1, 2, 3, 4, 5, 12, 13, 33]


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels see it: per row and 32 values, round(x * 127 / max|x|) * max|x| / 127."""
    k = x.shape[-1]
    padded = F.pad(x.float(), (0, -k % 32)).view(x.shape[0], -1, 32)
    max_abs = padded.abs().amax(-1, keepdim=True)
    inverse = torch.where(max_abs > 0, 127.0 / max_abs, torch.zeros_like(max_abs))
    return (torch.round(padded * inverse) * (max_abs / 127.0)).view(x.shape[0], -1)[:, :k]


def reference(x: torch.Tensor, dequantized: torch.Tensor) -> torch.Tensor:
    return quantized_activations(x).double() @ dequantized.double().T


def assert_matches(out: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32: the kernels' fp32 sums against float64; bf16: plus one rounding of the output."""
    tol = 1e-5 if out.dtype == torch.float32 else 8e-3
    scale = expected.abs().max().item() + 1e-6
    torch.testing.assert_close(out.double(), expected, atol=tol * scale, rtol=tol)


def fp16_at_or_above(value: torch.Tensor) -> torch.Tensor:
    half = value.half()
    return torch.where(half.float() < value, torch.nextafter(half, torch.tensor(torch.inf, dtype=torch.half)),
                       half).float()


def int8_half_scale(weight: torch.Tensor) -> torch.Tensor:
    """Each value's largest int8 rounding error, scale / 2: max|row| / 127 rounded up to fp16, never
    below 2^-14; [N, K]."""
    w = weight.float()
    scale = fp16_at_or_above((w.abs().amax(1, keepdim=True) / 127).clamp(min=2**-14))
    return (scale / 2).expand_as(w)


def group_squares(error: torch.Tensor, group_size: int) -> torch.Tensor:
    """The sum of squares of error [N, K] over each group of K; [N, groups]."""
    n, k = error.shape
    return F.pad(error.double() ** 2, (0, -k % group_size)).view(n, -1, group_size).sum(-1)


def min_max_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """The plain int4 quantizer, dequantized: each group's range [min, max] widened to hold 0, scale =
    range / 15 rounded up to fp16, a whole zero point, every value to its nearest level."""
    w = weight.float()
    n, k = w.shape
    groups = F.pad(w, (0, -k % group_size)).view(n, -1, group_size)
    low, high = groups.amin(-1, keepdim=True).clamp(max=0), groups.amax(-1, keepdim=True).clamp(min=0)
    scale = fp16_at_or_above(((high - low) / 15).clamp(min=2**-14))
    zero = torch.round(-low / scale).clamp(0, 15)
    q = (torch.round(groups / scale) + zero).clamp(0, 15)
    return ((q - zero) * scale).view(n, -1)[:, :k]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_weights_are_within_half_a_scale(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    weight = random_weight(*shape, dtype)
    dequantized = ops.unpack_linear_weight(ops.quantize_linear_weight(weight, "int8"))
    assert dequantized.dtype == torch.float32 and dequantized.shape == weight.shape
    error = (dequantized - weight.float()).abs()
    assert (error <= int8_half_scale(weight) * (1 + 2**-20)).all()
    # Not the source itself: the pack holds 8 bits a value.
    assert error.max() > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("shape", SHAPES)
def test_int4_search_never_loses_to_min_max(group_size: int, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    """Per row and group, the searched parameters' squared error is at most the plain quantizer's, and
    over the matrix it is clearly less (the partial last group of K included)."""
    weight = random_weight(*shape, dtype)
    source = weight.float()
    dequantized = ops.unpack_linear_weight(ops.quantize_linear_weight(weight, "int4", group_size))
    searched = group_squares(dequantized - source, group_size)
    plain = group_squares(min_max_int4(weight, group_size) - source, group_size)
    assert (searched <= plain * (1 + 1e-5) + 1e-15).all()
    if weight.numel() >= 1000:
        assert searched.sum() < 0.9 * plain.sum()


@pytest.mark.parametrize("scheme,group_size,bound",
                         [("int8", 0, 0.01), ("int4", 32, 0.0715), ("int4", 64, 0.083), ("int4", 128, 0.093)])
def test_quantization_error_of_a_gaussian_matrix(scheme: str, group_size: int, bound: float) -> None:
    """Relative Frobenius error: about 0.87% for int8 per channel; int4 7.05% in groups of 32 (llama.cpp's
    Q4_K: 7.13%; min-max ranges with whole zero points: 8.08%), 8.2% in 64, 9.1% in 128."""
    weight = torch.randn(256, 1024)
    dequantized = ops.unpack_linear_weight(ops.quantize_linear_weight(weight, scheme, group_size))
    error = ((dequantized - weight).norm() / weight.norm()).item()
    assert bound * 0.7 < error < bound


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme,group_size", SCHEMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantized_linear_matches_the_dequantized_reference(level: str, scheme: str, group_size: int,
                                                            dtype: torch.dtype, shape: tuple[int, int]) -> None:
    n, k = shape
    packed = ops.quantize_linear_weight(random_weight(n, k, dtype), scheme, group_size)
    dequantized = ops.unpack_linear_weight(packed)
    for t in BATCHES:
        x = torch.randn(t, k).to(dtype)
        out = torch.empty(t, n, dtype=dtype)
        ops.linear(out, x, packed)
        assert_matches(out, reference(x, dequantized))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme,group_size", SCHEMES)
def test_quantized_silu_mul_matches_linear_then_silu_and_mul(level: str, scheme: str, group_size: int,
                                                             dtype: torch.dtype) -> None:
    f, k = 37, 200
    gate, up = random_weight(f, k, dtype), random_weight(f, k, dtype)
    packed = ops.quantize_gate_up_weight(gate, up, scheme, group_size)
    gate_up = ops.unpack_linear_weight(packed)
    assert torch.equal(gate_up[:f], ops.unpack_linear_weight(ops.quantize_linear_weight(gate, scheme, group_size)))
    assert torch.equal(gate_up[f:], ops.unpack_linear_weight(ops.quantize_linear_weight(up, scheme, group_size)))
    for t in BATCHES:
        x = torch.randn(t, k).to(dtype)
        out = torch.empty(t, f, dtype=dtype)
        ops.linear_silu_mul(out, x, packed)
        # silu_and_mul's own rounding of gate and up to the output dtype, as the fused op does.
        both = reference(x, gate_up).to(dtype)
        expected = torch.empty(t, f, dtype=dtype)
        ops.silu_and_mul(expected, both)
        torch.testing.assert_close(out, expected, atol=2e-2 if dtype == torch.bfloat16 else 1e-4, rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme,group_size", [("int8", 0), ("int4", 32)])
def test_every_level_and_every_batch_gives_a_row_the_same_bits(scheme: str, group_size: int,
                                                               dtype: torch.dtype) -> None:
    """The seed contract: a row's output is the same alone and in any batch."""
    n, k = 300, 520
    packed = ops.quantize_linear_weight(random_weight(n, k, dtype), scheme, group_size)
    gate_up = ops.quantize_gate_up_weight(random_weight(n, k, dtype), random_weight(n, k, dtype), scheme, group_size)
    x = torch.randn(33, k).to(dtype)

    def run(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, activated = torch.empty(rows.shape[0], n, dtype=dtype), torch.empty(rows.shape[0], n, dtype=dtype)
        ops.linear(out, rows, packed)
        ops.linear_silu_mul(activated, rows, gate_up)
        return out, activated

    try:
        linear_everywhere = None
        for level in supported_levels():
            ops.linear_cpu_isa(level)
            alone = [run(x[i:i + 1]) for i in range(33)]
            for rows in (list(range(33)), [5, 6, 7], list(range(32, -1, -1))):
                out, activated = run(x[rows])
                for r, i in enumerate(rows):
                    assert torch.equal(out[r], alone[i][0][0]), (level, len(rows), i)
                    assert torch.equal(activated[r], alone[i][1][0]), (level, len(rows), i)
            # The dot products agree across levels too (silu's exp is each ISA's own, as for float weights).
            linear_out = torch.cat([o for o, _ in alone])
            linear_everywhere = linear_out if linear_everywhere is None else linear_everywhere
            assert torch.equal(linear_out, linear_everywhere), level
    finally:
        ops.linear_cpu_isa("best")


@pytest.mark.parametrize("scheme,group_size,bound", [("int8", 0, 0.02), ("int4", 32, 0.15)])
def test_quantized_linear_is_close_to_the_float_one(scheme: str, group_size: int, bound: float) -> None:
    weight = random_weight(256, 1024, torch.float32)
    x = torch.randn(8, 1024)
    out = torch.empty(8, 256)
    ops.linear(out, x, ops.quantize_linear_weight(weight, scheme, group_size))
    dense = F.linear(x, weight)
    assert ((out - dense).norm() / dense.norm()).item() < bound


def test_opcheck_quantize_and_linear() -> None:
    weight, gate, up = random_weight(37, 200, torch.bfloat16), random_weight(37, 200, torch.bfloat16), \
        random_weight(37, 200, torch.bfloat16)
    for scheme, group_size in SCHEMES:
        torch.library.opcheck(torch.ops.mistral_grpc.quantize_linear_weight, (weight, scheme, group_size))
        torch.library.opcheck(torch.ops.mistral_grpc.quantize_gate_up_weight, (gate, up, scheme, group_size))
        packed = ops.quantize_linear_weight(weight, scheme, group_size)
        x = torch.randn(3, 200).to(torch.bfloat16)
        torch.library.opcheck(torch.ops.mistral_grpc.linear, (torch.empty(3, 37, dtype=torch.bfloat16), x, packed, -1))
        gate_up = ops.quantize_gate_up_weight(gate, up, scheme, group_size)
        torch.library.opcheck(torch.ops.mistral_grpc.linear_silu_mul,
                              (torch.empty(3, 37, dtype=torch.bfloat16), x, gate_up, 1))


@pytest.mark.parametrize("call,message", [
    (lambda w: ops.quantize_linear_weight(w, "int3"), 'scheme must be "int8" or "int4"'),
    (lambda w: ops.quantize_linear_weight(w, "int4", 48), "int4 group_size must be 32, 64 or 128"),
    (lambda w: ops.quantize_linear_weight(w, "int8", 32), "int8 is per output channel; group_size must be 0"),
    (lambda w: ops.quantize_linear_weight(w.half(), "int8"), "must be float32 or bfloat16"),
    (lambda w: ops.quantize_linear_weight(w[0], "int8"), "must be a non-empty [N, K] matrix"),
    (lambda w: ops.quantize_gate_up_weight(w, w[:3], "int8"), "gate and up must have one shape"),
])
def test_bad_quantize_arguments_are_clear_errors(call, message: str) -> None:
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(random_weight(16, 64, torch.float32))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -4.6e5])
def test_a_weight_no_fp16_scale_can_hold_is_refused(scheme: str, value: float) -> None:
    weight = random_weight(20, 64, torch.float32)
    weight[17, 3] = value
    with pytest.raises(RuntimeError, match=r"holds a NaN or an infinity, or a value beyond \+-458528"):
        ops.quantize_linear_weight(weight, scheme)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_the_largest_weight_quantizes_to_finite_values(scheme: str) -> None:
    weight = random_weight(20, 64, torch.float32)
    weight[3, :2] = torch.tensor([-458528.0, 458528.0])
    dequantized = ops.unpack_linear_weight(ops.quantize_linear_weight(weight, scheme))
    assert dequantized.isfinite().all()
    assert ((dequantized[3, :2] - weight[3, :2]).abs() <= 458528 / 7.5).all()


def test_x_must_have_the_dtype_the_weight_was_quantized_from() -> None:
    packed = ops.quantize_linear_weight(random_weight(16, 64, torch.bfloat16), "int8")
    with pytest.raises(RuntimeError, match="x must be BFloat16 like the weight"):
        ops.linear(torch.empty(2, 16), torch.randn(2, 64), packed)


def test_a_corrupt_quantized_pack_is_refused() -> None:
    packed = ops.quantize_linear_weight(random_weight(16, 64, torch.float32), "int4")
    with pytest.raises(RuntimeError, match="corrupt"):
        ops.linear(torch.empty(2, 16), torch.randn(2, 64), packed[:-64].clone())
    header = packed.clone()
    header[12] = 7  # group_size 7
    with pytest.raises(RuntimeError, match="corrupt"):
        ops.linear(torch.empty(2, 16), torch.randn(2, 64), header)
