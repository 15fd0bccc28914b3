"""rotary_embedding against our plain-torch reference and against Hugging Face's own Mistral rotary."""

import pytest
import torch
from transformers import MistralConfig
from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding, apply_rotary_pos_emb

import reference
from mistral_grpc import ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cache_dtype", ["float32", "same"])
@pytest.mark.parametrize("tokens, q_heads, kv_heads, head_dim", [(1, 32, 8, 128), (13, 8, 2, 128), (7, 3, 1, 40)])
def test_rotary_matches_reference(device: str, dtype: torch.dtype, cache_dtype: str, tokens: int, q_heads: int,
                                  kv_heads: int, head_dim: int) -> None:
    cache_type = torch.float32 if cache_dtype == "float32" else dtype
    cache = reference.cos_sin_cache(4096, head_dim, 1e4, cache_type).to(device)
    positions = torch.randint(0, 4096, (tokens,), device=device)
    q = torch.randn(tokens, q_heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    expected_q, expected_k = reference.rotary_embedding(positions, q, k, cache)
    ops.rotary_embedding(positions, q, k, cache)
    torch.testing.assert_close(q, expected_q, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(k, expected_k, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_on_slices_of_a_fused_qkv(device: str) -> None:
    """q and k may be views into one [T, (Hq + 2 Hkv) D] projection: rotated in place, v untouched."""
    tokens, q_heads, kv_heads, head_dim = 5, 4, 2, 64
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, device=device)
    before = qkv.clone()
    q = qkv[:, : q_heads * head_dim].view(tokens, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    cache = reference.cos_sin_cache(64, head_dim, 1e4).to(device)
    positions = torch.arange(tokens, device=device) + 3
    expected_q, expected_k = reference.rotary_embedding(positions, q.clone(), k.clone(), cache)
    ops.rotary_embedding(positions, q, k, cache)
    torch.testing.assert_close(q, expected_q)
    torch.testing.assert_close(k, expected_k)
    torch.testing.assert_close(qkv[:, (q_heads + kv_heads) * head_dim :], before[:, (q_heads + kv_heads) * head_dim :],
                               atol=0, rtol=0)


@pytest.mark.parametrize("theta", [1e4, 1e6])  # Mistral v0.1 / v0.2 and v0.3
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_hugging_face(theta: float, dtype: torch.dtype) -> None:
    config = MistralConfig(hidden_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                           max_position_embeddings=32768, rope_theta=theta)
    tokens = 11
    positions = torch.randint(0, 32768, (tokens,))
    q = torch.randn(tokens, 4, 128, dtype=dtype)
    k = torch.randn(tokens, 2, 128, dtype=dtype)
    cos, sin = MistralRotaryEmbedding(config)(q, positions[None])
    # HF's layout is [batch, heads, seq, head_dim].
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    ops.rotary_embedding(positions, q, k, reference.cos_sin_cache(32768, 128, theta))
    # HF rounds cos/sin and each product to the dtype; we round once from fp32.
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(q, hf_q[0].transpose(0, 1), atol=tol, rtol=tol)
    torch.testing.assert_close(k, hf_k[0].transpose(0, 1), atol=tol, rtol=tol)


def test_rotary_opcheck() -> None:
    cache = reference.cos_sin_cache(32, 64, 1e4)
    args = (torch.tensor([0, 5, 31]), torch.randn(3, 4, 64), torch.randn(3, 2, 64), cache)
    torch.library.opcheck(torch.ops.mistral_grpc.rotary_embedding, args)


def _rotary_args(**overrides: torch.Tensor) -> dict[str, torch.Tensor]:
    args = {"positions": torch.tensor([0, 1, 2]), "q": torch.randn(3, 4, 64), "k": torch.randn(3, 2, 64),
            "cos_sin_cache": reference.cos_sin_cache(16, 64, 1e4)}
    return {**args, **overrides}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"positions": torch.tensor([0, 1, 16])}, r"positions\[2\] = 16 is outside"),
        ({"positions": torch.tensor([0, -1, 2])}, r"positions\[1\] = -1 is outside"),
        ({"positions": torch.tensor([0, 1, 2], dtype=torch.int32)}, "positions must be Long"),
        ({"positions": torch.tensor([0, 1])}, r"positions must have shape \[3\]"),
        ({"q": torch.randn(3, 4, 62)}, "head_dim"),
        ({"k": torch.randn(4, 2, 64)}, "same number of tokens"),
        ({"k": torch.randn(3, 2, 64, dtype=torch.bfloat16)}, "share a float dtype"),
        ({"q": torch.randn(4, 3, 64).transpose(0, 1)}, "contiguous"),
        ({"q": torch.randn(3, 4, 6), "k": torch.randn(3, 2, 6)}, "cos_sin_cache must be"),
        ({"cos_sin_cache": torch.empty(0, 64)}, r"max_position > 0"),
        ({"cos_sin_cache": reference.cos_sin_cache(16, 64, 1e4).double()}, "float32 or q's dtype"),
    ],
)
def test_rotary_rejects_bad_arguments(overrides: dict[str, torch.Tensor], message: str) -> None:
    args = _rotary_args(**overrides)
    with pytest.raises(RuntimeError, match=message):
        ops.rotary_embedding(args["positions"], args["q"], args["k"], args["cos_sin_cache"])


@pytest.mark.cuda
def test_rotary_rejects_mixed_devices() -> None:
    args = _rotary_args()
    with pytest.raises(RuntimeError, match="one device"):
        ops.rotary_embedding(args["positions"], args["q"].cuda(), args["k"].cuda(), args["cos_sin_cache"])
