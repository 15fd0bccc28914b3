"""engine.sampler.Sampler: per-row settings from SamplingParams and histories, through the ops."""

from dataclasses import dataclass, field

import pytest
import torch

from mistral_grpc.engine import sampler as sampler_module
from mistral_grpc.engine.sampler import Sampler
from mistral_grpc.engine.sampling_params import SamplingParams

VOCAB = 200
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@dataclass
class Row:
    params: SamplingParams
    seed: int = 0
    token_ids: list[int] = field(default_factory=lambda: [5, 6, 7, 5])
    prompt_len: int = 3


def mixed_rows() -> list[Row]:
    return [
        Row(SamplingParams(temperature=0.0)),
        Row(SamplingParams(temperature=0.8, top_p=0.9, top_k=20, logprobs=True, top_logprobs=5), seed=11),
        Row(SamplingParams(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5),
            seed=12, token_ids=[1, 2, 3, 4, 4, 9, 9, 9], prompt_len=4),
        Row(SamplingParams(temperature=0.0, frequency_penalty=2.0, logprobs=True, top_logprobs=2),
            token_ids=[0, 1, 2], prompt_len=1),
        Row(SamplingParams(temperature=1.5, top_k=3), seed=2**63 - 1, token_ids=list(range(50)), prompt_len=10),
    ]


def penalised(logits: torch.Tensor, row: Row) -> torch.Tensor:
    """Hugging Face's repetition penalty then OpenAI's presence / frequency penalties, by hand."""
    p = row.params
    x = logits.float().clone()
    seen = sorted(set(row.token_ids))
    x[seen] = torch.where(x[seen] > 0, x[seen] / p.repetition_penalty, x[seen] * p.repetition_penalty)
    counts = torch.bincount(torch.tensor(row.token_ids[row.prompt_len:], dtype=torch.int64), minlength=x.numel())
    return x - counts * p.frequency_penalty - (counts > 0) * p.presence_penalty


@pytest.mark.parametrize("device", DEVICES)
def test_each_row_gets_what_it_would_get_alone(device: str) -> None:
    rows = mixed_rows()
    logits = (torch.randn(len(rows), VOCAB) * 3).to(device)
    batch = Sampler(VOCAB).sample(logits, rows)
    for i, row in enumerate(rows):
        alone = Sampler(VOCAB).sample(logits[i : i + 1], [row])
        assert (batch.tokens[i], batch.logprobs[i], batch.top[i]) == (alone.tokens[0], alone.logprobs[0], alone.top[0])


def test_greedy_rows_take_the_argmax_of_the_penalised_logits() -> None:
    rows = mixed_rows()
    logits = torch.randn(len(rows), VOCAB) * 3
    logits[3, 1] = logits[3].max() + 1.0  # generated twice over: frequency 2.0 pushes it below another
    result = Sampler(VOCAB).sample(logits, rows)
    for i in (0, 3):
        expected = penalised(logits[i], rows[i])
        assert result.tokens[i] == int(expected.argmax())
        assert result.logprobs[i] == pytest.approx(float(expected.log_softmax(-1)[result.tokens[i]]), abs=1e-5)
    assert result.tokens[3] != 1


def test_logprobs_and_top_logprobs_are_under_the_penalised_logits_at_temperature_1() -> None:
    rows = mixed_rows()
    logits = torch.randn(len(rows), VOCAB) * 3
    result = Sampler(VOCAB).sample(logits, rows)
    for i, row in enumerate(rows):
        logprobs = penalised(logits[i], row).log_softmax(-1)
        assert result.logprobs[i] == pytest.approx(float(logprobs[result.tokens[i]]), abs=1e-5)
        n = row.params.top_logprobs
        values, ids = logprobs.topk(n) if n else (torch.empty(0), torch.empty(0, dtype=torch.int64))
        assert [t for t, _ in result.top[i]] == ids.tolist()
        assert [lp for _, lp in result.top[i]] == pytest.approx(values.tolist(), abs=1e-5)


def test_sampled_tokens_respect_top_k() -> None:
    row = Row(SamplingParams(temperature=2.0, top_k=3))
    logits = torch.randn(1, VOCAB)
    allowed = set(logits[0].topk(3).indices.tolist())
    drawn = {Sampler(VOCAB).sample(logits, [Row(row.params, seed=s)]).tokens[0] for s in range(100)}
    assert drawn <= allowed and len(drawn) > 1


def test_the_step_keys_the_draw() -> None:
    params = SamplingParams(temperature=1.0)
    logits = torch.zeros(1, VOCAB)
    sampler = Sampler(VOCAB)
    same = [sampler.sample(logits, [Row(params, seed=3, token_ids=[1, 2, 3], prompt_len=2)]).tokens[0]
            for _ in range(2)]
    by_step = {sampler.sample(logits, [Row(params, seed=3, token_ids=[1] * (2 + step), prompt_len=2)]).tokens[0]
               for step in range(20)}
    assert same[0] == same[1] and len(by_step) > 10


def test_neutral_batches_skip_the_penalty_op(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = sampler_module.ops.apply_penalties
    monkeypatch.setattr(sampler_module.ops, "apply_penalties", lambda *args: calls.append(args) or real(*args))
    logits = torch.randn(2, VOCAB)
    Sampler(VOCAB).sample(logits, [Row(SamplingParams()), Row(SamplingParams(temperature=0.0))])
    assert calls == []
    Sampler(VOCAB).sample(logits, [Row(SamplingParams()), Row(SamplingParams(presence_penalty=0.1))])
    (args,) = calls
    prompt_tokens, output_tokens = args[1], args[2]
    assert prompt_tokens.shape == (2, 0)  # no row needs its prompt: no repetition penalty
    assert output_tokens.tolist() == [[-1], [5]]  # the neutral row sends no history


def test_logits_are_left_unmodified() -> None:
    logits = torch.randn(len(mixed_rows()), VOCAB)
    before = logits.clone()
    Sampler(VOCAB).sample(logits, mixed_rows())
    assert torch.equal(logits, before)


def test_columns_past_the_vocabulary_are_never_sampled() -> None:
    logits = torch.randn(2, VOCAB + 56)
    logits[:, VOCAB:] = 100.0
    result = Sampler(VOCAB).sample(logits, [Row(SamplingParams(temperature=0.0)), Row(SamplingParams())])
    assert all(t < VOCAB for t in result.tokens)


def test_bfloat16_logits() -> None:
    rows = mixed_rows()
    logits = (torch.randn(len(rows), VOCAB) * 3).bfloat16()
    result = Sampler(VOCAB).sample(logits, rows)
    assert result.tokens[0] == int(logits[0].float().argmax())


def test_logits_that_do_not_fit_the_rows_are_rejected() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        Sampler(VOCAB).sample(torch.randn(3, VOCAB), mixed_rows())
    with pytest.raises(ValueError, match="do not fit"):
        Sampler(VOCAB).sample(torch.randn(1, VOCAB - 1), [Row(SamplingParams())])
