"""rms_norm / fused_add_rms_norm against plain torch (Hugging Face's MistralRMSNorm order)."""

import pytest
import torch

from mistral_grpc import ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 64), (7, 1000), (3, 5, 130)])
def test_rms_norm_matches_reference(device: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, dtype=dtype, device=device)
    w = torch.randn(shape[-1], dtype=dtype, device=device)
    out = torch.empty_like(x)
    ops.rms_norm(out, x, w, 1e-5)
    torch.testing.assert_close(out, reference_rms_norm(x, w, 1e-5), atol=TOL[dtype], rtol=TOL[dtype])


def test_rms_norm_opcheck() -> None:
    x = torch.randn(4, 96)
    w = torch.randn(96)
    torch.library.opcheck(torch.ops.mistral_grpc.rms_norm, (torch.empty_like(x), x, w, 1e-6))


def test_rms_norm_rejects_mismatched_weight() -> None:
    x = torch.randn(4, 96)
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(torch.empty_like(x), x, torch.randn(95), 1e-6)
