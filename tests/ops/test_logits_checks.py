"""Every op that takes logits (apply_penalties, sample, apply_token_bitmask) checks them with one check
(check_logits, csrc/checks.cpp): the same bad tensor gets the same message from each, its op's name in
front. Only the sampling ops also need a vocabulary to draw from; masking an empty one is a no-op."""

import re

import pytest
import torch

from mistral_grpc import ops
from test_penalties import penalty_args
from test_sampling import sample_args

ROWS, VOCAB = 3, 40

# Each op called on `logits` of ROWS rows, its other arguments valid for a vocabulary of VOCAB.
CALLS = {
    "apply_penalties": lambda logits: ops.apply_penalties(logits, *penalty_args()[1:]),
    "sample": lambda logits: ops.sample(logits, *sample_args(ROWS, VOCAB)[1:]),
    "apply_token_bitmask": lambda logits: ops.apply_token_bitmask(logits, torch.zeros(ROWS, 2, dtype=torch.int32)),
}

BAD_LOGITS = [
    (torch.randn(VOCAB), "logits must be 2-D [B, V] (got shape [40])"),
    (torch.randn(ROWS, VOCAB, dtype=torch.float64), "logits must be float32, bfloat16 or float16 (got Double)"),
    (torch.randn(VOCAB, ROWS).t(), "logits must be contiguous"),
]


@pytest.mark.parametrize("op", CALLS)
@pytest.mark.parametrize("logits,message", BAD_LOGITS)
def test_every_logits_op_rejects_bad_logits_alike(op: str, logits: torch.Tensor, message: str) -> None:
    with pytest.raises(RuntimeError, match=re.escape(f"{op}: {message}")):
        CALLS[op](logits)


@pytest.mark.parametrize("op", ["apply_penalties", "sample"])
def test_the_sampling_ops_need_a_vocabulary(op: str) -> None:
    with pytest.raises(RuntimeError, match=f"{op}: logits need a non-empty vocabulary dimension"):
        CALLS[op](torch.empty(ROWS, 0))


def test_masking_an_empty_vocabulary_changes_nothing() -> None:
    logits = torch.empty(ROWS, 0)
    ops.apply_token_bitmask(logits, torch.zeros(ROWS, 0, dtype=torch.int32))
    assert logits.shape == (ROWS, 0)
