"""pack_quantized_weight / pack_quantized_gate_up_weight: values quantized elsewhere (a pre-quantized
checkpoint) packed into the quantized linear ops' layout. The pack must hold exactly (q - zero) * scale,
scale rounded to fp16, as unpack_linear_weight reads it back, and the linear ops must multiply that."""

import pytest
import torch

from mistral_grpc import ops

# (bits, the op's group_size, K values per scale column)
LAYOUTS = [(8, 0, None), (4, 32, 32), (4, 64, 64), (4, 128, 128)]


def random_values(n: int, k: int, bits: int, group: int | None, scale_dtype: torch.dtype = torch.bfloat16,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    groups = 1 if group is None else -(-k // group)
    top = 1 << bits
    q = torch.randint(0, top, (n, k), generator=generator, dtype=torch.uint8)
    zero = torch.randint(0, top, (n, groups), generator=generator, dtype=torch.uint8)
    scale = (torch.rand(n, groups, generator=generator) * 0.02 + 1e-3).to(scale_dtype)
    return q, scale, zero


def dequantized(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int | None) -> torch.Tensor:
    columns = torch.zeros(q.shape[1], dtype=torch.long) if group is None else torch.arange(q.shape[1]) // group
    return (q.float() - zero[:, columns].float()) * scale.half().float()[:, columns]


@pytest.mark.parametrize("bits,group_size,group", LAYOUTS)
@pytest.mark.parametrize("n,k", [(37, 200), (16, 128), (5, 96)])
def test_the_pack_holds_exactly_the_given_values(bits: int, group_size: int, group: int | None, n: int, k: int) -> None:
    q, scale, zero = random_values(n, k, bits, group)
    packed = ops.pack_quantized_weight(q, scale, zero, bits, group_size, torch.float32)
    assert torch.equal(ops.unpack_linear_weight(packed), dequantized(q, scale, zero, group))


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scales_round_to_the_nearest_fp16(scale_dtype: torch.dtype) -> None:
    q, scale, zero = random_values(20, 64, 4, 32, scale_dtype)
    packed = ops.pack_quantized_weight(q, scale, zero, 4, 32, torch.bfloat16)
    assert torch.equal(ops.unpack_linear_weight(packed), dequantized(q, scale, zero, 32))
    if scale_dtype != torch.float32:  # bf16 and fp16 scales in fp16's normal range are exact
        exact = (q.float() - zero.repeat_interleave(32, 1).float()) * scale.float().repeat_interleave(32, 1)
        assert torch.equal(ops.unpack_linear_weight(packed), exact)


@pytest.mark.parametrize("bits,group_size,group", LAYOUTS)
def test_gate_up_packs_both_halves(bits: int, group_size: int, group: int | None) -> None:
    gate, up = random_values(23, 160, bits, group, seed=1), random_values(23, 160, bits, group, seed=2)
    packed = ops.pack_quantized_gate_up_weight(*gate, *up, bits, group_size, torch.float32)
    expected = torch.cat([dequantized(*gate, group), dequantized(*up, group)])
    assert torch.equal(ops.unpack_linear_weight(packed), expected)


@pytest.mark.parametrize("bits,group_size,group", LAYOUTS)
def test_the_linear_ops_multiply_the_packed_weight(bits: int, group_size: int, group: int | None) -> None:
    gate, up = random_values(48, 256, bits, group, seed=3), random_values(48, 256, bits, group, seed=4)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(5))
    out = torch.empty(5, 48)
    ops.linear(out, x, ops.pack_quantized_weight(*gate, bits, group_size, torch.float32))
    dense = x @ dequantized(*gate, group).T
    # x goes int8 per 32 values in the kernels: a relative error of about 1%.
    assert ((out - dense).norm() / dense.norm()).item() < 0.02
    ops.linear_silu_mul(out, x, ops.pack_quantized_gate_up_weight(*gate, *up, bits, group_size, torch.float32))
    dense = torch.nn.functional.silu(dense) * (x @ dequantized(*up, group).T)
    assert ((out - dense).norm() / dense.norm()).item() < 0.03


def test_opcheck() -> None:
    for bits, group_size, group in LAYOUTS:
        q, scale, zero = random_values(37, 200, bits, group)
        torch.library.opcheck(torch.ops.mistral_grpc.pack_quantized_weight,
                              (q, scale, zero, bits, group_size, torch.bfloat16))
        torch.library.opcheck(torch.ops.mistral_grpc.pack_quantized_gate_up_weight,
                              (q, scale, zero, q, scale, zero, bits, group_size, torch.float32))


def _int4() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return random_values(8, 64, 4, 32)


@pytest.mark.parametrize("call,message", [
    (lambda q, s, z: ops.pack_quantized_weight(q, s, z, 3, 32, torch.float32), "bits must be 8 or 4"),
    (lambda q, s, z: ops.pack_quantized_weight(q, s, z, 4, 48, torch.float32), "int4 group_size must be 32, 64 or 128"),
    (lambda q, s, z: ops.pack_quantized_weight(q, s[:, :1], z[:, :1], 8, 32, torch.float32),
     "int8 is per output channel; group_size must be 0"),
    (lambda q, s, z: ops.pack_quantized_weight(q, s, z, 4, 32, torch.float16), "activation must be float32 or bfloat16"),
    (lambda q, s, z: ops.pack_quantized_weight(q.int(), s, z, 4, 32, torch.float32), "weight q must be a non-empty uint8"),
    (lambda q, s, z: ops.pack_quantized_weight(q, s, z[:, :1], 4, 32, torch.float32),
     "weight zero must be uint8 [N, groups] = [8, 2]"),
    (lambda q, s, z: ops.pack_quantized_weight(q, s.int(), z, 4, 32, torch.float32),
     "weight scale must be float32, bfloat16 or float16 [N, groups] = [8, 2]"),
    (lambda q, s, z: ops.pack_quantized_weight(q, s, z, 4, 64, torch.float32), "= [8, 1]"),
    (lambda q, s, z: ops.pack_quantized_weight(q * 2, s, z, 4, 32, torch.float32), "int4 q and zero must be in [0, 15]"),
    (lambda q, s, z: ops.pack_quantized_weight(q, s.float() * 1e7, z, 4, 32, torch.float32),
     "scale must be finite and within fp16's range"),
    (lambda q, s, z: ops.pack_quantized_weight(q, s.float().fill_(float("nan")), z, 4, 32, torch.float32),
     "scale must be finite"),
    (lambda q, s, z: ops.pack_quantized_gate_up_weight(q, s, z, q[:4], s[:4], z[:4], 4, 32, torch.float32),
     "up q must have the shape of gate q"),
])
def test_bad_arguments_are_clear_errors(call, message: str) -> None:
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(*_int4())
