"""Plain-torch references for the extension's layer ops: slow, obvious, written from the op contracts
in docs/ops.md and Hugging Face's Mistral code, never from our kernels."""

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, new_residual)."""
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(new_residual, weight, eps), new_residual


def cos_sin_cache(max_pos: int, head_dim: int, theta: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF rotate_half: x * cos + rotate_half(x) * sin with (i, i + D/2) pairs."""
    half = cache.shape[-1] // 2
    cos = cache[positions, :half].float().repeat(1, 2)[:, None, :]
    sin = cache[positions, half:].float().repeat(1, 2)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)

    return rotate(q), rotate(k)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        k_cache[slot // block_size, slot % block_size] = k[t]
        v_cache[slot // block_size, slot % block_size] = v[t]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                    sliding_window: int) -> torch.Tensor:
    """Gathers each sequence's cache, then plain masked softmax attention in fp32 (GQA by repeat)."""
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    for b in range(seq_lens.numel()):
        start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        seq_len, q_len = int(seq_lens[b]), end - start
        if q_len == 0:
            continue
        slots = torch.arange(seq_len)
        blocks = block_tables[b, slots // block_size].long()
        keys = k_cache[blocks, slots % block_size].float().repeat_interleave(group, dim=1)  # [S, Hq, D]
        values = v_cache[blocks, slots % block_size].float().repeat_interleave(group, dim=1)
        query_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
        key_pos = torch.arange(seq_len)[None, :]
        allowed = key_pos <= query_pos
        if sliding_window > 0:
            allowed &= key_pos > query_pos - sliding_window
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), keys) * scale
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype)
    return out
