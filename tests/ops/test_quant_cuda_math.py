"""The CUDA quantized kernels' arithmetic (csrc/common/quant_gemv.h), run on the CPU by the ops
cuda_quant_math_linear / cuda_quant_math_dequantize, against a float64 reference that multiplies x itself
(weight-only: CUDA does not quantize the activations) by the exact dequantized weights of
unpack_linear_weight. What these prove here, without a GPU, the kernels of csrc/cuda/linear_quant.cu only
wrap in a thread mapping (tests/ops/test_quant_linear_cuda.py runs those where a GPU is lent).
"""

import pytest
import torch

from mistral_grpc import ops
from mistral_grpc.model import linear
from test_linear import random_weight
from test_quant_linear import SCHEMES, SHAPES

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# 1..8 rows are one GEMV pass (the kernel's widths 1, 2, 4, 8, rows past the batch masked); 9 and 33 take
# several passes here (on CUDA they take the dequantize + GEMM path).
BATCHES = [1, 2, 3, 4, 5, 8, 9, 33]
# fp32 sums against float64; half types: one rounding of the output.
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def quantized(weight: torch.Tensor, scheme: str, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """A pack for x of `dtype` as the decoder makes it (float16: quantized from float32, then named)."""
    return linear._quantized_pack(lambda activation: ops.quantize_linear_weight(weight.to(activation), scheme,
                                                                                group_size), "cpu", dtype)


def quantized_gate_up(gate: torch.Tensor, up: torch.Tensor, scheme: str, group_size: int,
                      dtype: torch.dtype) -> torch.Tensor:
    return linear._quantized_pack(lambda activation: ops.quantize_gate_up_weight(gate.to(activation),
                                                                                 up.to(activation), scheme,
                                                                                 group_size), "cpu", dtype)


def dequantized(packed: torch.Tensor) -> torch.Tensor:
    """The exact weights of any pack, float16 ones included (their bytes but the header are float32's)."""
    return ops.unpack_linear_weight(ops.with_activation(packed, torch.float32))


def assert_matches(out: torch.Tensor, expected: torch.Tensor) -> None:
    tol = TOLERANCES[out.dtype]
    scale = expected.abs().max().item() + 1e-6
    torch.testing.assert_close(out.double(), expected, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme,group_size", SCHEMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_gives_the_exact_weights_in_the_activation_dtype(scheme: str, group_size: int,
                                                                    dtype: torch.dtype,
                                                                    shape: tuple[int, int]) -> None:
    n, k = shape
    weight = random_weight(n, k, dtype)
    packed = quantized(weight, scheme, group_size, dtype)
    dense = ops.cuda_quant_math_dequantize(packed, dtype)
    assert dense.dtype == dtype and torch.equal(dense, dequantized(packed).to(dtype))
    gate_up = quantized_gate_up(weight, -2 * weight, scheme, group_size, dtype)
    assert torch.equal(ops.cuda_quant_math_dequantize(gate_up, dtype), dequantized(gate_up).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme,group_size", SCHEMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gemv_matches_the_weight_only_reference(scheme: str, group_size: int, dtype: torch.dtype,
                                               shape: tuple[int, int]) -> None:
    n, k = shape
    packed = quantized(random_weight(n, k, torch.float32), scheme, group_size, dtype)
    weights = dequantized(packed).double()
    for t in BATCHES:
        x = torch.randn(t, k).to(dtype)
        out = torch.full((t, n), float("nan"), dtype=dtype)
        ops.cuda_quant_math_linear(out, x, packed)
        assert_matches(out, x.double() @ weights.T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme,group_size", SCHEMES)
def test_gate_up_gemv_matches_linear_then_silu_and_mul(scheme: str, group_size: int, dtype: torch.dtype) -> None:
    f, k = 37, 200
    packed = quantized_gate_up(random_weight(f, k, torch.float32), random_weight(f, k, torch.float32), scheme,
                               group_size, dtype)
    weights = dequantized(packed).double()
    for t in BATCHES:
        x = torch.randn(t, k).to(dtype)
        out = torch.empty(t, f, dtype=dtype)
        ops.cuda_quant_math_linear(out, x, packed)
        expected = torch.empty(t, f, dtype=dtype)
        ops.silu_and_mul(expected, (x.double() @ weights.T).to(dtype))
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
        torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


def test_a_row_gets_the_same_bits_alone_and_in_any_gemv_pass() -> None:
    """The rows of one pass share nothing: x rows past the batch (masked) and other rows leave a row as it is."""
    n, k = 45, 300
    packed = quantized(random_weight(n, k, torch.float32), "int4", 64, torch.bfloat16)
    x = torch.randn(11, k).to(torch.bfloat16)
    alone = []
    for i in range(11):
        out = torch.empty(1, n, dtype=torch.bfloat16)
        ops.cuda_quant_math_linear(out, x[i:i + 1], packed)
        alone.append(out[0])
    out = torch.empty(11, n, dtype=torch.bfloat16)
    ops.cuda_quant_math_linear(out, x, packed)
    assert torch.equal(out, torch.stack(alone))


def test_x_and_out_may_be_row_strided_views() -> None:
    n, k = 20, 96
    packed = quantized(random_weight(n, k, torch.float32), "int8", 0, torch.float32)
    x = torch.randn(3, k + 5)[:, :k]
    out = torch.zeros(3, n + 7)
    ops.cuda_quant_math_linear(out[:, :n], x, packed)
    assert_matches(out[:, :n], x.double() @ dequantized(packed).double().T)
    assert (out[:, n:] == 0).all()


def test_with_activation_only_names_the_dtype() -> None:
    """The header field at the offset ops.with_activation writes is the one the C++ reads: a bfloat16 pack
    renamed float32 is byte for byte the pack quantized from the same values in float32, and runs on the CPU."""
    weight = random_weight(33, 70, torch.bfloat16)
    renamed = ops.with_activation(ops.quantize_linear_weight(weight, "int4", 32), torch.float32)
    assert torch.equal(renamed, ops.quantize_linear_weight(weight.float(), "int4", 32))
    out = torch.empty(2, 33)
    ops.linear(out, torch.randn(2, 70), renamed)
    with pytest.raises(ValueError, match="activation must be float32, bfloat16 or float16"):
        ops.with_activation(renamed, torch.int8)


def test_the_cpu_ops_refuse_a_float16_pack() -> None:
    """float16 activations are the CUDA kernels' only: the CPU keeps its checks and messages."""
    packed = quantized(random_weight(16, 64, torch.float32), "int8", 0, torch.float16)
    with pytest.raises(RuntimeError, match="corrupt"):
        ops.linear(torch.empty(2, 16, dtype=torch.float16), torch.randn(2, 64).half(), packed)


# The CUDA op's host-side checks (check_quantized_linear_args) and its device-side header check, through
# the CPU op that runs the same ones.
@pytest.mark.parametrize("change,message", [
    (lambda out, x, p: (out, x, p[:-64].clone()), r"the packed weight \(\d+ bytes\) is not an int8 or int4 pack "
                                                  r"of \[20, 96\]"),
    (lambda out, x, p: (out[:, :10], x, p), r"is not an int8 or int4 pack of \[10, 96\]"),
    (lambda out, x, p: (out.bfloat16(), x, p), r"out must be \[3, N\] Float"),
    (lambda out, x, p: (out, x.t(), p), r"x must be \[T, K\] \(K > 0\) with unit stride"),
    (lambda out, x, p: (out, x.long(), p), "x must be float32, bfloat16 or float16"),
    (lambda out, x, p: (out, x, p.view(torch.int8)), "expected a quantized packed weight"),
    (lambda out, x, p: (out, x, torch.cat([p[:1], p])[1:]), "expected a quantized packed weight"),
    (lambda out, x, p: (out.half(), x.half(), p), r"header does not describe a quantized \[20, 96\] pack for Half"),
])
def test_bad_arguments_are_clear_errors(change, message: str) -> None:
    packed = quantized(random_weight(20, 96, torch.float32), "int8", 0, torch.float32)
    out, x, packed = change(torch.zeros(3, 20), torch.randn(3, 96), packed)
    with pytest.raises(RuntimeError, match=message):
        ops.cuda_quant_math_linear(out, x, packed)


def test_packs_of_one_size_are_told_apart_by_their_header() -> None:
    """K = 270: int4 in groups of 32 and of 64 take the same bytes (the host, which checks the size, cannot
    tell them apart); the kernels read the group size from the header, and refuse a header that is wrong."""
    weight = random_weight(20, 270, torch.float32)
    x = torch.randn(2, 270)
    by_32, by_64 = (ops.quantize_linear_weight(weight, "int4", g) for g in (32, 64))
    assert by_32.numel() == by_64.numel()
    for packed in (by_32, by_64):
        out = torch.empty(2, 20)
        ops.cuda_quant_math_linear(out, x, packed)
        assert_matches(out, x.double() @ dequantized(packed).double().T)
    corrupt = by_32.clone()
    corrupt[12] = 48  # group_size 48: no int4 geometry
    with pytest.raises(RuntimeError, match="header does not describe"):
        ops.cuda_quant_math_linear(torch.empty(2, 20), x, corrupt)


def test_quantization_on_cuda_is_checked_against_the_build(monkeypatch) -> None:
    for dtype in DTYPES:
        monkeypatch.setattr(linear, "cuda_quantized_kernels_built", lambda: True)
        linear.check_quantization("int4", "cuda", dtype)
        monkeypatch.setattr(linear, "cuda_quantized_kernels_built", lambda: False)
        with pytest.raises(linear.QuantizationError, match="--quantization int4 on CUDA needs the extension built "
                                                           "with its CUDA kernels"):
            linear.check_quantization("int4", "cuda", dtype)
    with pytest.raises(linear.QuantizationError, match="runs on the CPU and CUDA only"):
        linear.check_quantization("int8", "meta", torch.bfloat16)
    with pytest.raises(linear.QuantizationError, match="needs --dtype float32 or bfloat16 on the CPU"):
        linear.check_quantization("int8", "cpu", torch.float16)
