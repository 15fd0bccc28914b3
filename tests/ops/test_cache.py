"""reshape_and_cache against plain torch indexing: slots out of order, padding slots (-1) skipped."""

import pytest
import torch

import reference
from mistral_grpc import ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _caches(num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
            device: str) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens, block_size, kv_heads, head_dim", [(1, 16, 8, 128), (37, 16, 2, 128), (9, 5, 3, 40)])
def test_reshape_and_cache_matches_reference(device: str, dtype: torch.dtype, tokens: int, block_size: int,
                                             kv_heads: int, head_dim: int) -> None:
    num_blocks = 12
    k_cache, v_cache = _caches(num_blocks, block_size, kv_heads, head_dim, dtype, device)
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    slots[::4] = -1  # padding tokens
    slots = slots.to(device)
    k = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=device)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.reshape_and_cache(k, v, expected_k, expected_v, slots)
    ops.reshape_and_cache(k, v, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, expected_k, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, expected_v, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_reshape_and_cache_from_a_fused_qkv(device: str) -> None:
    tokens, q_heads, kv_heads, head_dim = 6, 4, 2, 32
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, device=device)
    k = qkv[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (q_heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    k_cache, v_cache = _caches(4, 4, kv_heads, head_dim, torch.float32, device)
    slots = torch.tensor([15, 0, 7, -1, 3, 8], device=device)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.reshape_and_cache(k, v, expected_k, expected_v, slots)
    ops.reshape_and_cache(k, v, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, expected_k, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, expected_v, atol=0, rtol=0)


def test_reshape_and_cache_opcheck() -> None:
    k_cache, v_cache = _caches(3, 4, 2, 16, torch.bfloat16, "cpu")
    k, v = torch.randn(5, 2, 16, dtype=torch.bfloat16), torch.randn(5, 2, 16, dtype=torch.bfloat16)
    args = (k, v, k_cache, v_cache, torch.tensor([0, 11, -1, 4, 5]))
    torch.library.opcheck(torch.ops.mistral_grpc.reshape_and_cache, args)


def _cache_args(**overrides: torch.Tensor) -> dict[str, torch.Tensor]:
    k_cache, v_cache = _caches(3, 4, 2, 16, torch.float32, "cpu")
    args = {"k": torch.randn(2, 2, 16), "v": torch.randn(2, 2, 16), "k_cache": k_cache, "v_cache": v_cache,
            "slot_mapping": torch.tensor([0, 5])}
    return {**args, **overrides}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"slot_mapping": torch.tensor([0, 12])}, r"slot_mapping\[1\] = 12 is past the cache's 12 slots"),
        ({"slot_mapping": torch.tensor([0, 5], dtype=torch.int32)}, "slot_mapping must be Long"),
        ({"slot_mapping": torch.tensor([0, 5, 6])}, r"slot_mapping must have shape \[2\]"),
        ({"k": torch.randn(2, 3, 16), "v": torch.randn(2, 3, 16)}, "num_kv_heads=2"),
        ({"v": torch.randn(2, 2, 8)}, "must have k's shape"),
        ({"k": torch.randn(2, 2, 16, dtype=torch.bfloat16)}, "share a float dtype"),
        ({"v_cache": torch.randn(3, 4, 2, 16).bfloat16()}, "share a float dtype"),
        ({"k": torch.randn(2, 16, 2).transpose(1, 2)}, "contiguous"),
        ({"k_cache": torch.randn(3, 4, 16, 2).transpose(2, 3)}, "k_cache must be contiguous"),
        ({"k_cache": torch.randn(12, 2, 16)}, "k_cache must be"),
    ],
)
def test_reshape_and_cache_rejects_bad_arguments(overrides: dict[str, torch.Tensor], message: str) -> None:
    args = _cache_args(**overrides)
    with pytest.raises(RuntimeError, match=message):
        ops.reshape_and_cache(args["k"], args["v"], args["k_cache"], args["v_cache"], args["slot_mapping"])


@pytest.mark.cuda
def test_reshape_and_cache_rejects_mixed_devices() -> None:
    args = _cache_args()
    with pytest.raises(RuntimeError, match="one device"):
        ops.reshape_and_cache(args["k"], args["v"], args["k_cache"].cuda(), args["v_cache"].cuda(),
                              args["slot_mapping"].cuda())
