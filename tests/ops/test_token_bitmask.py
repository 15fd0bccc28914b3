"""apply_token_bitmask against a plain-torch unpacking of the bits and against xgrammar's own
apply_token_bitmask_inplace (the layout's owner)."""

import pytest
import torch

from mistral_grpc import ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def reference_mask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Bit j of word w allows token 32 * w + j; every other logit becomes -inf."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # arithmetic shift: the sign bit is masked off by & 1
    allowed = bits.reshape(bitmask.shape[0], -1)[:, : logits.shape[1]].bool()
    return logits.masked_fill(~allowed, float("-inf"))


def random_bitmask(rows: int, vocab: int, density: float, generator: torch.Generator) -> torch.Tensor:
    words = -(-vocab // 32)
    allowed = torch.rand(rows, words * 32, generator=generator) < density
    weights = torch.tensor([1 << j for j in range(32)], dtype=torch.int64)
    packed = (allowed.reshape(rows, words, 32).long() * weights).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the same bits as int32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 1000, 32000, 32768])
def test_matches_reference(device: str, dtype: torch.dtype, vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    rows = 5
    logits = torch.randn(rows, vocab, generator=gen).to(dtype)
    bitmask = random_bitmask(rows, vocab, 0.3, gen)
    bitmask[1] = -1  # a row without a grammar: all ones
    bitmask[2] = 0  # nothing allowed
    logits, bitmask = logits.to(device), bitmask.to(device)
    expected = reference_mask(logits, bitmask)
    ops.apply_token_bitmask(logits, bitmask)
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)
    assert torch.isinf(logits[2]).all()


@pytest.mark.parametrize("vocab", [33, 32000])
def test_agrees_with_xgrammar(vocab: int) -> None:
    xgrammar = pytest.importorskip("xgrammar")  # imported here: the GPU check's machine lacks it
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, vocab, generator=gen)
    bitmask = random_bitmask(4, vocab, 0.5, gen)
    expected = logits.clone()
    xgrammar.apply_token_bitmask_inplace(expected, bitmask)
    ops.apply_token_bitmask(logits, bitmask)
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)


def test_hand_checked_bits() -> None:
    logits = torch.zeros(2, 40)
    # Row 0 allows tokens 0, 5, 31 (the sign bit) and 32; row 1 allows every token but 33.
    bitmask = torch.tensor([[1 | 1 << 5 | -(1 << 31), 1], [-1, ~(1 << 1)]], dtype=torch.int32)
    ops.apply_token_bitmask(logits, bitmask)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [0, 5, 31, 32]
    assert torch.isinf(logits[1]).nonzero().flatten().tolist() == [33]


def test_opcheck() -> None:
    logits = torch.randn(3, 70)
    bitmask = random_bitmask(3, 70, 0.5, torch.Generator().manual_seed(0))
    torch.library.opcheck(torch.ops.mistral_grpc.apply_token_bitmask, (logits, bitmask))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda l, b: (l, b.long()), "bitmask must be int32"),
        (lambda l, b: (l, b[:, :2]), r"bitmask must be \[B, ceil\(V / 32\)\] = \[3, 3\]"),
        (lambda l, b: (l, b[:2]), r"bitmask must be \[B, ceil\(V / 32\)\]"),
        (lambda l, b: (l[0], b), "logits must be 2-D"),
        (lambda l, b: (l.double(), b), "float32, bfloat16 or float16"),
        (lambda l, b: (l.t().contiguous().t(), b), "logits must be contiguous"),
        (lambda l, b: (l, torch.zeros(3, 6, dtype=torch.int32)[:, ::2]), "bitmask must be contiguous"),
    ],
)
def test_rejects_bad_arguments(make, message: str) -> None:
    logits, bitmask = make(torch.randn(3, 70), torch.zeros(3, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=message):
        ops.apply_token_bitmask(logits, bitmask)


@pytest.mark.cuda
def test_rejects_mixed_devices() -> None:
    with pytest.raises(RuntimeError, match="logits' device"):
        ops.apply_token_bitmask(torch.randn(2, 64, device="cuda"), torch.zeros(2, 2, dtype=torch.int32))
