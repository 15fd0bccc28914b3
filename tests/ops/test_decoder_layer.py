"""decoder_layer (CPU, packed weights) against a plain-torch layer, and bit for bit against the same
ops chained from Python as model/decoder.py does where the op does not apply."""

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import reference
from mistral_grpc import ops

Q_HEADS, KV_HEADS, HEAD_DIM, HIDDEN, FFN, BLOCK = 8, 2, 32, 96, 80, 4
Q_SIZE, KV_SIZE = Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
EPS, SCALE = 1e-5, HEAD_DIM**-0.5
# (tokens already cached, new tokens) per sequence: a prompt, a decode step, a prompt chunk.
SEQS = [(0, 5), (6, 1), (3, 4)]


@dataclass
class Layer:
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    qkv: torch.Tensor
    o: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    def packed(self, quantization: str = "none") -> tuple[torch.Tensor, ...]:
        if quantization != "none":
            return (ops.quantize_linear_weight(self.qkv, quantization), ops.quantize_linear_weight(self.o, quantization),
                    ops.quantize_gate_up_weight(self.gate, self.up, quantization),
                    ops.quantize_linear_weight(self.down, quantization))
        return (ops.pack_linear_weight(self.qkv), ops.pack_linear_weight(self.o),
                ops.pack_gate_up_weight(self.gate, self.up), ops.pack_linear_weight(self.down))


def random_layer(dtype: torch.dtype) -> Layer:
    def weight(n: int, k: int) -> torch.Tensor:
        return (torch.randn(n, k) / math.sqrt(k)).to(dtype)

    def norm() -> torch.Tensor:
        return (1 + 0.1 * torch.randn(HIDDEN)).to(dtype)

    return Layer(norm(), norm(), weight(Q_SIZE + 2 * KV_SIZE, HIDDEN), weight(HIDDEN, Q_SIZE), weight(FFN, HIDDEN),
                 weight(FFN, HIDDEN), weight(HIDDEN, FFN))


@dataclass
class Step:
    """A packed batch over a paged cache whose earlier tokens hold random k/v; free slots are NaN."""

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor

    def metadata(self) -> tuple[torch.Tensor, ...]:
        return self.positions, self.slot_mapping, self.block_tables, self.seq_lens, self.query_start_loc


def make_step(dtype: torch.dtype) -> Step:
    blocks = [math.ceil((cached + new) / BLOCK) for cached, new in SEQS]
    pool = torch.randperm(sum(blocks) + 2).tolist()
    tables = torch.zeros(len(SEQS), max(blocks), dtype=torch.int32)
    key_cache = torch.full((len(pool), BLOCK, KV_HEADS, HEAD_DIM), float("nan"), dtype=dtype)
    value_cache = key_cache.clone()
    positions, slots = [], []
    for b, ((cached, new), needed) in enumerate(zip(SEQS, blocks)):
        tables[b, :needed] = torch.tensor([pool.pop() for _ in range(needed)], dtype=torch.int32)
        for pos in range(cached + new):
            slot = int(tables[b, pos // BLOCK]) * BLOCK + pos % BLOCK
            if pos < cached:
                key_cache.view(-1, KV_HEADS, HEAD_DIM)[slot] = torch.randn(KV_HEADS, HEAD_DIM, dtype=dtype)
                value_cache.view(-1, KV_HEADS, HEAD_DIM)[slot] = torch.randn(KV_HEADS, HEAD_DIM, dtype=dtype)
            else:
                positions.append(pos)
                slots.append(slot)
    starts = [0]
    for _, new in SEQS:
        starts.append(starts[-1] + new)
    return Step(torch.tensor(positions), torch.tensor(slots), tables,
                torch.tensor([c + n for c, n in SEQS], dtype=torch.int32), torch.tensor(starts, dtype=torch.int32),
                key_cache, value_cache)


def reference_layer(layer: Layer, hidden: torch.Tensor, residual: torch.Tensor, step: Step,
                    cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: F.linear on the dense weights and the reference ops. Returns (hidden, residual)
    and writes the new k/v into step's caches."""
    tokens = hidden.shape[0]
    x, residual = reference.fused_add_rms_norm(hidden, residual, layer.input_norm, EPS)
    q, k, v = F.linear(x, layer.qkv).split([Q_SIZE, KV_SIZE, KV_SIZE], dim=-1)
    q, k = reference.rotary_embedding(step.positions, q.reshape(tokens, Q_HEADS, HEAD_DIM),
                                      k.reshape(tokens, KV_HEADS, HEAD_DIM), cos_sin)
    reference.reshape_and_cache(k, v.reshape(tokens, KV_HEADS, HEAD_DIM), step.key_cache, step.value_cache,
                                step.slot_mapping)
    attended = reference.paged_attention(q, step.key_cache, step.value_cache, step.block_tables, step.seq_lens,
                                         step.query_start_loc, SCALE, 0)
    x, residual = reference.fused_add_rms_norm(F.linear(attended.reshape(tokens, Q_SIZE), layer.o), residual,
                                               layer.post_attention_norm, EPS)
    gate_up = torch.cat([F.linear(x, layer.gate), F.linear(x, layer.up)], dim=-1)
    return F.linear(reference.silu_and_mul(gate_up), layer.down), residual


def chained_layer(packed: tuple[torch.Tensor, ...], layer: Layer, hidden: torch.Tensor, residual: torch.Tensor,
                  step: Step, cos_sin: torch.Tensor) -> torch.Tensor:
    """The ops one by one through torch.ops, as model/decoder.py's _layer runs them."""
    qkv_w, o_w, gate_up_w, down_w = packed
    tokens = hidden.shape[0]
    ops.fused_add_rms_norm(hidden, residual, layer.input_norm, EPS)
    qkv = hidden.new_empty(tokens, Q_SIZE + 2 * KV_SIZE)
    ops.linear(qkv, hidden, qkv_w)
    q, k, v = qkv.split([Q_SIZE, KV_SIZE, KV_SIZE], dim=-1)
    q, k, v = (t.view(tokens, -1, HEAD_DIM) for t in (q, k, v))
    ops.rotary_embedding(step.positions, q, k, cos_sin)
    ops.reshape_and_cache(k, v, step.key_cache, step.value_cache, step.slot_mapping)
    attended = torch.empty_like(q)
    ops.paged_attention(attended, q, step.key_cache, step.value_cache, step.block_tables, step.seq_lens,
                        step.query_start_loc, SCALE, 0)
    x = hidden.new_empty(tokens, HIDDEN)
    ops.linear(x, attended.view(tokens, Q_SIZE), o_w)
    ops.fused_add_rms_norm(x, residual, layer.post_attention_norm, EPS)
    activated = hidden.new_empty(tokens, FFN)
    ops.linear_silu_mul(activated, x, gate_up_w)
    out = hidden.new_empty(tokens, HIDDEN)
    ops.linear(out, activated, down_w)
    return out


def run_op(packed: tuple[torch.Tensor, ...], layer: Layer, hidden: torch.Tensor, residual: torch.Tensor, step: Step,
           cos_sin: torch.Tensor) -> None:
    ops.decoder_layer(hidden, residual, layer.input_norm, layer.post_attention_norm, *packed, step.key_cache,
                      step.value_cache, *step.metadata(), cos_sin, EPS, SCALE, 0)


def inputs(dtype: torch.dtype) -> tuple[Layer, torch.Tensor, torch.Tensor, Step, torch.Tensor]:
    tokens = sum(new for _, new in SEQS)
    return (random_layer(dtype), torch.randn(tokens, HIDDEN, dtype=dtype), torch.randn(tokens, HIDDEN, dtype=dtype),
            make_step(dtype), reference.cos_sin_cache(64, HEAD_DIM, 1e4, dtype))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
def test_matches_plain_torch(dtype: torch.dtype, tol: float) -> None:
    layer, hidden, residual, step, cos_sin = inputs(dtype)
    expected_step = Step(*step.metadata(), step.key_cache.clone(), step.value_cache.clone())
    expected_hidden, expected_residual = reference_layer(layer, hidden, residual, expected_step, cos_sin)
    run_op(layer.packed(), layer, hidden, residual, step, cos_sin)
    torch.testing.assert_close(hidden, expected_hidden, atol=tol, rtol=tol)
    torch.testing.assert_close(residual, expected_residual, atol=tol, rtol=tol)
    for got, want in ((step.key_cache, expected_step.key_cache), (step.value_cache, expected_step.value_cache)):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, equal_nan=True)


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_the_ops_chained(dtype: torch.dtype, quantization: str) -> None:
    layer, hidden, residual, step, cos_sin = inputs(dtype)
    packed = layer.packed(quantization)
    chained_step = Step(*step.metadata(), step.key_cache.clone(), step.value_cache.clone())
    chained_residual = residual.clone()
    chained = chained_layer(packed, layer, hidden.clone(), chained_residual, chained_step, cos_sin)
    run_op(packed, layer, hidden, residual, step, cos_sin)
    assert torch.equal(hidden, chained)
    assert torch.equal(residual, chained_residual)
    assert torch.equal(step.key_cache.nan_to_num(), chained_step.key_cache.nan_to_num())
    assert torch.equal(step.value_cache.nan_to_num(), chained_step.value_cache.nan_to_num())


def test_opcheck() -> None:
    layer, hidden, residual, step, cos_sin = inputs(torch.float32)
    args = (hidden, residual, layer.input_norm, layer.post_attention_norm, *layer.packed(), step.key_cache,
            step.value_cache, *step.metadata(), cos_sin, EPS, SCALE, 0)
    torch.library.opcheck(torch.ops.mistral_grpc.decoder_layer, args)


def assert_rejected_unchanged(packed: tuple[torch.Tensor, ...], layer: Layer, hidden: torch.Tensor,
                              residual: torch.Tensor, step: Step, cos_sin: torch.Tensor, match: str) -> None:
    """The op raises, and every argument it writes is as it was: all checks come before the first write."""
    before = [t.clone() for t in (hidden, residual, step.key_cache, step.value_cache)]
    with pytest.raises(RuntimeError, match=match):
        run_op(packed, layer, hidden, residual, step, cos_sin)
    for now, then in zip((hidden, residual, step.key_cache, step.value_cache), before):
        assert torch.equal(now.nan_to_num(), then.nan_to_num())


@pytest.mark.parametrize("swap", ["qkv too narrow", "gate_up for down", "down for gate_up", "o for qkv", "bf16"])
def test_rejects_wrong_weights(swap: str) -> None:
    layer, hidden, residual, step, cos_sin = inputs(torch.float32)
    qkv_w, o_w, gate_up_w, down_w = layer.packed()
    if swap == "qkv too narrow":  # not (Hq + 2 Hkv) * D for the cache's Hkv and D
        qkv_w = ops.pack_linear_weight(layer.qkv[:-HEAD_DIM // 2])
    elif swap == "gate_up for down":
        down_w = gate_up_w
    elif swap == "down for gate_up":
        gate_up_w = down_w
    elif swap == "o for qkv":
        qkv_w = o_w
    else:
        qkv_w, o_w, gate_up_w, down_w = Layer(**{k: v.bfloat16() for k, v in vars(layer).items()}).packed()
    assert_rejected_unchanged((qkv_w, o_w, gate_up_w, down_w), layer, hidden, residual, step, cos_sin,
                              "decoder_layer: .*(weight|outputs)")


def test_rejects_bad_metadata() -> None:
    layer, hidden, residual, step, cos_sin = inputs(torch.float32)
    step.seq_lens[1] = 10_000  # past the sequence's blocks
    assert_rejected_unchanged(layer.packed(), layer, hidden, residual, step, cos_sin, "seq_lens")
