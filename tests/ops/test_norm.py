"""rms_norm / fused_add_rms_norm against plain torch (Hugging Face's MistralRMSNorm order)."""

import pytest
import torch

import reference
from mistral_grpc import ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
SHAPES = [(1, 64), (7, 1000), (3, 5, 130), (2, 4096)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(device: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, dtype=dtype, device=device)
    w = torch.randn(shape[-1], dtype=dtype, device=device)
    out = torch.empty_like(x)
    ops.rms_norm(out, x, w, 1e-5)
    torch.testing.assert_close(out, reference.rms_norm(x, w, 1e-5), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_add_rms_norm_matches_reference(device: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, dtype=dtype, device=device)
    residual = torch.randn(shape, dtype=dtype, device=device)
    w = torch.randn(shape[-1], dtype=dtype, device=device)
    expected_x, expected_residual = reference.fused_add_rms_norm(x, residual, w, 1e-6)
    ops.fused_add_rms_norm(x, residual, w, 1e-6)
    # The sum is rounded to the dtype exactly as torch does; the norm then sees the same input.
    torch.testing.assert_close(residual, expected_residual, atol=0, rtol=0)
    torch.testing.assert_close(x, expected_x, atol=TOL[dtype], rtol=TOL[dtype])


def test_rms_norm_opcheck() -> None:
    x = torch.randn(4, 96)
    w = torch.randn(96)
    torch.library.opcheck(torch.ops.mistral_grpc.rms_norm, (torch.empty_like(x), x, w, 1e-6))


def test_fused_add_rms_norm_opcheck() -> None:
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    args = (x, torch.randn_like(x), torch.randn(96).bfloat16(), 1e-6)
    torch.library.opcheck(torch.ops.mistral_grpc.fused_add_rms_norm, args)


def test_rms_norm_rejects_mismatched_weight() -> None:
    x = torch.randn(4, 96)
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(torch.empty_like(x), x, torch.randn(95), 1e-6)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda x, r, w: (x, r[:, :64], w), "residual must have x's shape"),
        (lambda x, r, w: (x, r.bfloat16(), w), "share a dtype"),
        (lambda x, r, w: (x.t(), r.t(), w[:4]), "contiguous"),
        (lambda x, r, w: (x.double(), r.double(), w.double()), "float32, bfloat16 or float16"),
        (lambda x, r, w: (x, x, w), "different tensors"),
    ],
)
def test_fused_add_rms_norm_rejects_bad_arguments(make, message: str) -> None:
    x, r, w = make(torch.randn(4, 96), torch.randn(4, 96), torch.randn(96))
    with pytest.raises(RuntimeError, match=message):
        ops.fused_add_rms_norm(x, r, w, 1e-6)


@pytest.mark.cuda
def test_rms_norm_rejects_mixed_devices() -> None:
    x = torch.randn(4, 96, device="cuda")
    with pytest.raises(RuntimeError, match="one device"):
        ops.rms_norm(torch.empty_like(x), x, torch.randn(96), 1e-6)
