"""silu_and_mul against plain torch (Hugging Face's MistralMLP: act_fn(gate_proj(x)) * up_proj(x))."""

import pytest
import torch

import reference
from mistral_grpc import ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 2 * 14336), (5, 2 * 7), (3, 2, 2 * 100), (9, 2 * 4097)])
def test_silu_and_mul_matches_reference(device: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gate_up = (torch.randn(shape, device=device) * 4).to(dtype)  # reaches silu's saturated tails
    out = torch.empty(*shape[:-1], shape[-1] // 2, dtype=dtype, device=device)
    ops.silu_and_mul(out, gate_up)
    torch.testing.assert_close(out, reference.silu_and_mul(gate_up), atol=TOL[dtype], rtol=TOL[dtype])


def test_silu_and_mul_extremes() -> None:
    gate = torch.tensor([-1e4, -100.0, -88.0, 0.0, 88.0, 100.0, 1e4, float("inf")])
    gate_up = torch.cat([gate, torch.ones_like(gate)])[None]
    out = torch.empty(1, gate.numel())
    ops.silu_and_mul(out, gate_up)
    torch.testing.assert_close(out, reference.silu_and_mul(gate_up))


def test_silu_and_mul_opcheck() -> None:
    gate_up = torch.randn(3, 64, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.mistral_grpc.silu_and_mul, (torch.empty(3, 32, dtype=torch.bfloat16), gate_up))


@pytest.mark.parametrize(
    "out, gate_up, message",
    [
        (torch.empty(3, 31), torch.randn(3, 64), "out must have shape"),
        (torch.empty(3, 32), torch.randn(3, 63), "must be even"),
        (torch.empty(3, 32, dtype=torch.bfloat16), torch.randn(3, 64), "dtype"),
        (torch.empty(3, 32), torch.randn(64, 3).t(), "contiguous"),
        (torch.empty(3, 32, dtype=torch.int32), torch.randint(0, 5, (3, 64), dtype=torch.int32), "float32, bfloat16"),
    ],
)
def test_silu_and_mul_rejects_bad_arguments(out: torch.Tensor, gate_up: torch.Tensor, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        ops.silu_and_mul(out, gate_up)
