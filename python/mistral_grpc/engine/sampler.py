"""From one step's logits to one token per sequence: penalties, then sampling, then logprobs.

The per-row settings travel as tensors to the extension's `apply_penalties` and `sample` ops
(csrc/cpu/sampling.cpp, csrc/cuda/sampling.cu), so a batch may mix greedy and sampled rows,
penalties and none, any top-k / top-p, on whatever device the logits live on.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from mistral_grpc import ops
from mistral_grpc.engine.sampling_params import SamplingParams


class SamplingRow(Protocol):
    """What the sampler reads from a sequence (engine.sequence.Sequence has it)."""

    params: SamplingParams  # validated before it gets here: out-of-range values never reach the ops
    seed: int  # params.seed, or the engine's per-request random draw when that is None
    token_ids: list[int]  # prompt, then generated tokens
    prompt_len: int


@dataclass(frozen=True)
class SamplerOutput:
    tokens: list[int]
    logprobs: list[float]  # log_softmax of the penalised logits at the chosen token
    top: list[list[tuple[int, float]]]  # per row, params.top_logprobs (token, logprob) pairs, best first


class Sampler:
    """Samples the next token of every row in a batch.

    Randomness: row i draws one Philox number keyed by (rows[i].seed, its step), the step being
    the number of tokens it has generated so far. The same seed and history therefore give the
    same token whatever else shares the batch. The sampler never invents seeds: when
    SamplingParams.seed is None the engine draws a fresh random 63-bit seed once per request
    (and spreads a request's n choices over distinct seeds), which is what makes unseeded
    requests random.
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size  # logits columns past it (padding of the LM head) are never sampled

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
               allowed: torch.Tensor | None = None) -> SamplerOutput:
        """logits [len(rows), >= vocab_size], any float dtype; left unmodified unless `allowed` is given.

        allowed: structured output's token bitmask, int32 [len(rows), ceil(vocab_size / 32)], bit set
        = token allowed (engine/structured.py), or None. It masks logits in place (sparing a copy of
        the batch's logits each step). Masked tokens are never drawn (greedy takes the best allowed
        one), but logprobs stay those of the penalised logits: the mask, like temperature, top-k and
        top-p, shapes the draw and not the model's distribution.
        """
        if logits.dim() != 2 or logits.shape[0] != len(rows) or logits.shape[1] < self.vocab_size:
            raise ValueError(f"logits of shape {tuple(logits.shape)} do not fit {len(rows)} rows "
                             f"of a {self.vocab_size}-token vocabulary")
        logits = logits[:, : self.vocab_size].contiguous()
        params = [row.params for row in rows]
        if not all(_neutral(p) for p in params):
            logits = logits.to(torch.float32, copy=True)  # penalties write in place
            _apply_penalties(logits, rows)

        device = logits.device
        top = _top_logprobs(logits, params)  # before the mask, like the normalizers below
        renormalize = None
        if allowed is not None:
            renormalize = _unmasked_log_normalizers(logits, params)
            ops.apply_token_bitmask(logits, allowed.to(device))
        tokens = torch.empty(len(rows), dtype=torch.int64, device=device)
        logprobs = torch.empty(len(rows), dtype=torch.float32, device=device)
        ops.sample(logits,
                   _column([p.temperature for p in params], torch.float32, device),
                   _column([p.top_p for p in params], torch.float32, device),
                   _column([p.top_k for p in params], torch.int64, device),
                   _column([row.seed for row in rows], torch.int64, device),
                   _column([len(row.token_ids) - row.prompt_len for row in rows], torch.int64, device),
                   tokens, logprobs)
        if renormalize is not None:
            index, normalizers = renormalize
            # The chosen token was allowed, so its logit is the same masked or not.
            chosen = logits.index_select(0, index).gather(1, tokens.index_select(0, index).unsqueeze(1))
            logprobs[index] = chosen.squeeze(1).float() - normalizers
        return SamplerOutput(tokens.tolist(), logprobs.tolist(), top)


def _neutral(p: SamplingParams) -> bool:
    return p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0


def _column(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _padded(histories: list[Sequence[int]], device: torch.device) -> torch.Tensor:
    """[B, longest] int64, each row's ids then -1 padding."""
    out = torch.full((len(histories), max(map(len, histories), default=0)), -1, dtype=torch.int64)
    for i, ids in enumerate(histories):
        if ids:
            out[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
    return out.to(device)


def _apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Only penalised rows send their histories, and prompts only where repetition needs them."""
    params = [row.params for row in rows]
    prompts = [row.token_ids[: row.prompt_len] if p.repetition_penalty != 1.0 else () for row, p in zip(rows, params)]
    outputs = [row.token_ids[row.prompt_len:] if not _neutral(p) else () for row, p in zip(rows, params)]
    device = logits.device
    ops.apply_penalties(logits, _padded(prompts, device), _padded(outputs, device),
                        _column([p.repetition_penalty for p in params], torch.float32, device),
                        _column([p.presence_penalty for p in params], torch.float32, device),
                        _column([p.frequency_penalty for p in params], torch.float32, device))


def _unmasked_log_normalizers(logits: torch.Tensor,
                              params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, logsumexp of their unmasked logits) for the constrained rows that report logprobs: the
    sample op gives logprobs under the logits it draws from, which will be masked."""
    asking = [i for i, p in enumerate(params) if p.structured is not None and p.logprobs]
    if not asking:
        return None
    index = torch.tensor(asking, device=logits.device)
    return index, torch.logsumexp(logits.index_select(0, index).float(), dim=-1)


def _top_logprobs(logits: torch.Tensor, params: list[SamplingParams]) -> list[list[tuple[int, float]]]:
    """The top_logprobs most likely tokens of each row that asks, under the same distribution as
    the chosen token's logprob (penalised logits, temperature 1)."""
    top: list[list[tuple[int, float]]] = [[] for _ in params]
    asking = [i for i, p in enumerate(params) if p.top_logprobs > 0]
    if not asking:
        return top
    widest = min(max(params[i].top_logprobs for i in asking), logits.shape[1])
    index = torch.tensor(asking, device=logits.device)
    values, ids = torch.log_softmax(logits.index_select(0, index).float(), dim=-1).topk(widest, dim=-1)
    for i, row_values, row_ids in zip(asking, values.tolist(), ids.tolist()):
        n = params[i].top_logprobs
        top[i] = list(zip(row_ids[:n], row_values[:n]))
    return top
