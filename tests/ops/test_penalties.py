"""apply_penalties against a plain-torch reference (Hugging Face's repetition penalty, OpenAI's
presence / frequency penalties, in vLLM's order)."""

import pytest
import torch

from mistral_grpc import ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def reference_penalties(logits: torch.Tensor, prompt: list[list[int]], output: list[list[int]],
                        repetition: list[float], presence: list[float], frequency: list[float]) -> torch.Tensor:
    out = logits.float().clone()
    for r in range(out.shape[0]):
        seen = sorted({t for t in prompt[r] + output[r] if t >= 0})
        if seen:
            x = out[r, seen]
            out[r, seen] = torch.where(x > 0, x / repetition[r], x * repetition[r])
        counts = torch.bincount(torch.tensor([t for t in output[r] if t >= 0], dtype=torch.int64),
                                minlength=out.shape[1]).float()
        out[r] -= counts * frequency[r] + (counts > 0).float() * presence[r]
    return out.to(logits.dtype)


def padded(rows: list[list[int]], device: str) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([row + [-1] * (width - len(row)) for row in rows], dtype=torch.int64, device=device)


def run_penalties(logits: torch.Tensor, prompt: list[list[int]], output: list[list[int]], repetition: list[float],
                  presence: list[float], frequency: list[float]) -> torch.Tensor:
    device = logits.device
    out = logits.clone()
    column = lambda values: torch.tensor(values, dtype=torch.float32, device=device)  # noqa: E731
    ops.apply_penalties(out, padded(prompt, device), padded(output, device), column(repetition), column(presence),
                        column(frequency))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_penalties_match_reference(device: str, dtype: torch.dtype) -> None:
    rows, vocab = 12, 300
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(dtype)
    lengths = torch.randint(0, 120, (rows, 2), generator=gen).tolist()
    # Small id ranges make duplicates and prompt/output overlap common.
    prompt = [torch.randint(0, 80, (lp,), generator=gen).tolist() for lp, _ in lengths]
    output = [torch.randint(40, 120, (lo,), generator=gen).tolist() for _, lo in lengths]
    repetition = [1.0, 1.3, 0.7, 2.0, 1.0, 1.0, 10.0, 0.1, 1.1, 1.0, 1.0, 1.5]
    presence = [0.0, 0.5, -0.5, 2.0, 0.0, 1.0, 0.0, -2.0, 0.3, 0.0, 0.0, 0.0]
    frequency = [0.0, 0.2, 0.4, -1.0, 0.0, 0.0, 2.0, 1.0, -0.3, 0.5, 0.0, 0.0]
    out = run_penalties(logits.to(device), prompt, output, repetition, presence, frequency)
    expected = reference_penalties(logits, prompt, output, repetition, presence, frequency)
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    torch.testing.assert_close(out.cpu(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_repetition_divides_positive_and_multiplies_negative_logits(device: str) -> None:
    logits = torch.tensor([[-2.0, 3.0, 0.0, -1.0, 4.0]], device=device)
    out = run_penalties(logits, [[0, 1, 2]], [[2, 0]], [2.0], [0.0], [0.0])
    assert out.tolist() == [[-4.0, 1.5, 0.0, -1.0, 4.0]]  # tokens 0 and 2, seen twice, penalised once


@pytest.mark.parametrize("device", DEVICES)
def test_presence_and_frequency_count_generated_tokens_only(device: str) -> None:
    logits = torch.zeros(1, 5, device=device)
    out = run_penalties(logits, [[0, 0, 1]], [[1, 3, 3, 3]], [1.0], [0.5], [0.25])
    assert out.tolist() == [[0.0, -0.75, 0.0, -1.25, 0.0]]


@pytest.mark.parametrize("device", DEVICES)
def test_neutral_rows_padding_and_out_of_vocab_ids_are_left_alone(device: str) -> None:
    logits = torch.randn(2, 6, device=device)
    out = run_penalties(logits, [[1, 2, -1], [-1, 6, 99]], [[3, 3], [-5, 7]], [1.0, 3.0], [0.0, 1.0], [0.0, 1.0])
    assert torch.equal(out, logits)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_histories(device: str) -> None:
    logits = torch.randn(3, 10, device=device)
    empty = torch.empty(3, 0, dtype=torch.int64, device=device)
    ones = torch.ones(3, device=device)
    out = logits.clone()
    ops.apply_penalties(out, empty, empty, ones * 2, ones, ones)
    assert torch.equal(out, logits)


def penalty_args() -> tuple:
    return (torch.randn(3, 40), torch.randint(-1, 40, (3, 7)), torch.randint(-1, 40, (3, 5)),
            torch.tensor([1.0, 1.2, 0.8]), torch.tensor([0.0, 0.5, -0.5]), torch.tensor([0.0, 0.1, 1.0]))


def test_apply_penalties_opcheck() -> None:
    torch.library.opcheck(torch.ops.mistral_grpc.apply_penalties, penalty_args())


@pytest.mark.parametrize("position,bad,message", [
    (0, torch.randn(3, 40, dtype=torch.float64), "float32, bfloat16 or float16"),
    (1, torch.zeros(3, 7, dtype=torch.int32), "prompt_tokens must be Long"),
    (2, torch.zeros(2, 5, dtype=torch.int64), "output_tokens must be 2-D with one row per logits row"),
    (2, torch.zeros(15, dtype=torch.int64), "output_tokens must be 2-D"),
    (3, torch.ones(3, dtype=torch.float64), "repetition must be Float"),
    (5, torch.ones(4), "frequency must be 1-D with one row per logits row"),
])
def test_apply_penalties_rejects_bad_arguments(position: int, bad: torch.Tensor, message: str) -> None:
    args = list(penalty_args())
    args[position] = bad
    with pytest.raises(RuntimeError, match=message):
        ops.apply_penalties(*args)
