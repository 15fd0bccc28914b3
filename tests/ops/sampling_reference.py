"""Plain-torch / plain-Python references for the sampling ops, written from the rule in
docs/ops.md and the issue (never from our kernels): Philox4x32-10 from its paper, top-k /
top-p by a full descending sort, the inverse CDF by cumsum in float64."""

import torch

_MASK32 = 0xFFFFFFFF


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """Random123's Philox4x32 with 10 rounds (Salmon et al., SC 2011)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0, p1 & _MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & _MASK32)
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return c0, c1, c2, c3


def uniform(seed: int, offset: int) -> float:
    """The sampler's draw: key = seed, counter = (offset, 0), top 24 bits of the first word."""
    word = philox4x32_10((offset & _MASK32, offset >> 32, 0, 0), (seed & _MASK32, seed >> 32))[0]
    return (word >> 8) / 2**24


def top_k_mask(x: torch.Tensor, top_k: int) -> torch.Tensor:
    """Every token whose logit is >= the k-th largest (all of them when top-k is off)."""
    if 0 < top_k < x.numel():
        return x >= x.sort(descending=True).values[top_k - 1]
    return torch.ones_like(x, dtype=torch.bool)


def top_p_mass(x: torch.Tensor, keep: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits in descending order, the survivors' running probability mass in that order)."""
    probs = torch.where(keep, torch.softmax(x / temperature, -1), 0.0)
    values, order = x.sort(descending=True)
    return values, (probs / probs.sum())[order].cumsum(0)


def keep_mask(logits: torch.Tensor, top_k: int, top_p: float, temperature: float) -> torch.Tensor:
    """The tokens a row may sample: top-k with ties, then the smallest descending set of the
    renormalised survivors reaching top_p, plus ties with its last token."""
    x = logits.double()
    keep = top_k_mask(x, top_k)
    if top_p < 1.0:
        values, mass = top_p_mass(x, keep, temperature)
        last = int((mass < top_p * mass[-1]).sum())  # first position whose running mass reaches top_p
        keep &= x >= values[min(last, x.numel() - 1)]
    return keep


def sample_row(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, seed: int,
               offset: int) -> tuple[int, float]:
    """(token, log_softmax(logits)[token]) for one row."""
    x = logits.double()
    logprobs = torch.log_softmax(x, -1)
    if temperature == 0:
        token = int(torch.argmax(x))  # first maximum
        return token, float(logprobs[token])
    weights = torch.where(keep_mask(logits, top_k, top_p, temperature), torch.exp((x - x.max()) / temperature), 0.0)
    cdf = weights.cumsum(0)
    token = int((cdf <= uniform(seed, offset) * cdf[-1]).sum())
    return token, float(logprobs[token])




def margin_between(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, seed: int, offset: int,
                   a: int, b: int) -> float:
    """How far, as a share of the total, the draw is from choosing token a rather than b (or b rather than
    a): the distance from the target u * total to the running weights that separate them, or from top_p
    to the running mass that decides top-p's last survivor. 0 when a == b."""
    if a == b:
        return 0.0
    x = logits.double()
    weights = torch.where(keep_mask(logits, top_k, top_p, temperature), torch.exp((x - x.max()) / temperature), 0.0)
    cdf = weights.cumsum(0) / weights.sum()
    target = uniform(seed, offset)
    lo, hi = sorted((a, b))
    margin = max(abs(float(cdf[hi - 1]) - target), abs(float(cdf[lo]) - target))
    if top_p < 1.0:
        _, mass = top_p_mass(x, top_k_mask(x, top_k), temperature)
        last = int((mass < top_p).sum())
        margin = min(margin, *(abs(float(mass[i]) - top_p) for i in (last - 1, last) if 0 <= i < x.numel()))
    return margin
