"""Quantized linear and linear_silu_mul on CUDA (csrc/cuda/linear_quant.cu) against the float64 weight-only
reference (x itself times the exact dequantized weights), on the packs the CPU makes, moved to the GPU:
the GEMV (up to 8 rows) and the dequantize + cuBLAS path (more), int8 and int4 in every group size, odd
shapes, float32 / bfloat16 / float16 activations. Runs where a GPU is lent (marker `cuda`)."""

import subprocess
import sys
import textwrap

import pytest
import torch

from mistral_grpc import ops
from test_linear import random_weight
from test_quant_cuda_math import (BATCHES, DTYPES, TOLERANCES, dequantized, quantized, quantized_gate_up)
from test_quant_linear import SCHEMES, SHAPES

pytestmark = pytest.mark.cuda

# Past 8 rows the weights are dequantized to x's dtype before cuBLAS: bfloat16 / float16 round each weight
# once more (the dense models' weights are in that dtype too). Both paths and their boundary.
CUDA_BATCHES = sorted({*BATCHES, 7, 12, 13, 16, 17, 32})


def assert_matches(out: torch.Tensor, expected: torch.Tensor) -> None:
    tol = TOLERANCES[out.dtype] * (2 if out.dtype != torch.float32 else 1)
    scale = expected.abs().max().item() + 1e-6
    torch.testing.assert_close(out.cpu().double(), expected, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme,group_size", SCHEMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantized_linear_matches_the_weight_only_reference(scheme: str, group_size: int, dtype: torch.dtype,
                                                            shape: tuple[int, int]) -> None:
    n, k = shape
    packed = quantized(random_weight(n, k, torch.float32), scheme, group_size, dtype)
    weights = dequantized(packed).double()
    device_pack = packed.cuda()
    for t in CUDA_BATCHES:
        x = torch.randn(t, k).to(dtype)
        out = torch.full((t, n), float("nan"), dtype=dtype, device="cuda")
        ops.linear(out, x.cuda(), device_pack)
        assert_matches(out, x.double() @ weights.T)
        if t <= 8:  # the GEMV: the CPU run of its arithmetic, up to the order of the fp32 sums
            emulated = torch.empty(t, n, dtype=dtype)
            ops.cuda_quant_math_linear(emulated, x, packed)
            torch.testing.assert_close(out.cpu(), emulated, atol=TOLERANCES[dtype], rtol=TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme,group_size", SCHEMES)
@pytest.mark.parametrize("shape", [(37, 200), (16, 64), (300, 520)])
def test_quantized_silu_mul_matches_linear_then_silu_and_mul(scheme: str, group_size: int, dtype: torch.dtype,
                                                             shape: tuple[int, int]) -> None:
    f, k = shape
    packed = quantized_gate_up(random_weight(f, k, torch.float32), random_weight(f, k, torch.float32), scheme,
                               group_size, dtype)
    weights = dequantized(packed).double()
    device_pack = packed.cuda()
    for t in CUDA_BATCHES:
        x = torch.randn(t, k).to(dtype)
        out = torch.empty(t, f, dtype=dtype, device="cuda")
        ops.linear_silu_mul(out, x.cuda(), device_pack)
        expected = torch.empty(t, f, dtype=dtype)
        ops.silu_and_mul(expected, (x.double() @ weights.T).to(dtype))
        tol = 3e-2 if dtype == torch.bfloat16 else 4e-3
        torch.testing.assert_close(out.cpu(), expected, atol=tol, rtol=tol)


def test_the_decode_rows_are_independent_of_each_other() -> None:
    """Within the GEMV (up to 8 rows) a row's result is the same alone and beside others."""
    n, k = 300, 520
    packed = quantized(random_weight(n, k, torch.float32), "int4", 32, torch.bfloat16).cuda()
    x = torch.randn(8, k, device="cuda").bfloat16()
    together = torch.empty(8, n, dtype=torch.bfloat16, device="cuda")
    ops.linear(together, x, packed)
    for i in range(8):
        alone = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
        ops.linear(alone, x[i:i + 1], packed)
        assert torch.equal(alone[0], together[i])


def test_strided_x_and_out_and_an_empty_batch() -> None:
    n, k = 40, 130
    packed = quantized(random_weight(n, k, torch.float32), "int8", 0, torch.bfloat16)
    weights = dequantized(packed).double()
    for t in (3, 20):
        x = torch.randn(t, k + 6).bfloat16()[:, :k]
        out = torch.zeros(t, n + 8, dtype=torch.bfloat16, device="cuda")
        ops.linear(out[:, :n], x.cuda(), packed.cuda())
        assert_matches(out[:, :n], x.double() @ weights.T)
        assert (out[:, n:] == 0).all()
    ops.linear(torch.empty(0, n, dtype=torch.bfloat16, device="cuda"),
               torch.empty(0, k, dtype=torch.bfloat16, device="cuda"), packed.cuda())


def test_opcheck() -> None:
    for scheme, group_size in SCHEMES:
        packed = quantized(random_weight(37, 200, torch.float32), scheme, group_size, torch.bfloat16).cuda()
        gate_up = quantized_gate_up(random_weight(37, 200, torch.float32), random_weight(37, 200, torch.float32),
                                    scheme, group_size, torch.bfloat16).cuda()
        for t in (3, 12):
            x = torch.randn(t, 200, device="cuda").bfloat16()
            out = torch.empty(t, 37, dtype=torch.bfloat16, device="cuda")
            torch.library.opcheck(torch.ops.mistral_grpc.linear, (out, x, packed, -1))
            torch.library.opcheck(torch.ops.mistral_grpc.linear_silu_mul, (out, x, gate_up, 1))


@pytest.mark.parametrize("change,message", [
    (lambda out, x, p: (out, x, p[:-64].clone()), r"is not an int8 or int4 pack of \[20, 96\]"),
    (lambda out, x, p: (out, x, p.cpu()), "packed_weight is on cpu but x is on cuda"),
    (lambda out, x, p: (out.cpu(), x, p), "out is on cpu but x is on cuda"),
    (lambda out, x, p: (out.float(), x, p), r"out must be \[3, N\] BFloat16"),
    (lambda out, x, p: (out, x[:, :95], p), r"is not an int8 or int4 pack of \[20, 95\]"),
])
def test_bad_arguments_are_clear_errors(change, message: str) -> None:
    packed = quantized(random_weight(20, 96, torch.float32), "int8", 0, torch.bfloat16).cuda()
    out, x, packed = change(torch.zeros(3, 20, dtype=torch.bfloat16, device="cuda"),
                            torch.randn(3, 96, device="cuda").bfloat16(), packed)
    with pytest.raises(RuntimeError, match=message):
        ops.linear(out, x, packed)


def test_prompt_rows_out_of_range_is_a_clear_error() -> None:
    packed = quantized(random_weight(20, 96, torch.float32), "int8", 0, torch.bfloat16).cuda()
    x = torch.randn(3, 96, device="cuda").bfloat16()
    with pytest.raises(RuntimeError, match=r"prompt_rows must be -1 or in \[0, 3\], got 4"):
        ops.linear(torch.empty(3, 20, dtype=torch.bfloat16, device="cuda"), x, packed, 4)


def test_a_header_that_does_not_match_stops_the_kernel() -> None:
    """A pack of the right size whose header names another dtype (or a gate_up pack given to linear) is
    caught on the device, where the host does not read: a device-side assert (in a child process, since
    it ends the CUDA context)."""
    script = textwrap.dedent("""
        import torch
        from mistral_grpc import ops
        from mistral_grpc.model.linear import _quantized_pack
        weight = torch.randn(20, 96)
        packed = _quantized_pack(lambda a: ops.quantize_linear_weight(weight.to(a), "int8"), "cuda",
                                 torch.float16)
        out = torch.empty(3, 20, dtype=torch.bfloat16, device="cuda")
        ops.linear(out, torch.randn(3, 96, device="cuda").bfloat16(), packed)
        torch.cuda.synchronize()
        print("no assert")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "no assert" not in done.stdout
    assert "device-side assert" in done.stderr or "header does not match" in done.stderr, done.stderr[-2000:]
