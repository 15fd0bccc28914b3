"""Typed wrappers over torch.ops.mistral_grpc.* (schemas in csrc/registration.cpp, described in docs/ops.md).

Each wrapper is followed by its fake (meta) kernel, which torch.compile and opcheck trace through
without running a kernel: for an op that writes into tensors the caller owns it only has to exist; for
one that returns a tensor it returns one of the right size.
"""

import math

import torch

import mistral_grpc._C  # noqa: F401  (registers the ops)

_ops = torch.ops.mistral_grpc

# prompt_rows of linear, linear_silu_mul and decoder_layer: no split, the kernels go by the batch's size.
KERNELS_BY_BATCH_SIZE = -1


def _writes_in_place(name: str) -> None:
    """Registers the fake kernel of an op that returns nothing (it writes into the caller's tensors)."""
    torch.library.register_fake(f"mistral_grpc::{name}")(lambda *args, **kwargs: None)


def rms_norm(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """out = x * rsqrt(mean(x^2) + eps) * weight, fp32 accumulation, Hugging Face's rounding order."""
    _ops.rms_norm(out, x, weight, eps)


_writes_in_place("rms_norm")


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """residual += x; x = rms_norm(residual), both in place."""
    _ops.fused_add_rms_norm(x, residual, weight, eps)


_writes_in_place("fused_add_rms_norm")


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Rotates q [T,Hq,D] and k [T,Hkv,D] in place; cos_sin_cache [max_pos, D] = cos | sin halves."""
    _ops.rotary_embedding(positions, q, k, cos_sin_cache)


_writes_in_place("rotary_embedding")


def silu_and_mul(out: torch.Tensor, gate_up: torch.Tensor) -> None:
    """out [T,F] = silu(gate_up[:, :F]) * gate_up[:, F:]."""
    _ops.silu_and_mul(out, gate_up)


_writes_in_place("silu_and_mul")


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """Writes token t's k/v into cache slot slot_mapping[t] (block * block_size + offset); -1 skips."""
    _ops.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)


_writes_in_place("reshape_and_cache")


def paged_attention(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                    scale: float, sliding_window: int) -> None:
    """Causal attention of packed queries over the paged cache: prefill, chunked prefill and decode."""
    _ops.paged_attention(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window)


_writes_in_place("paged_attention")


def apply_penalties(logits: torch.Tensor, prompt_tokens: torch.Tensor, output_tokens: torch.Tensor,
                    repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> None:
    """Repetition (prompt + output), presence and frequency (output only) penalties, in place."""
    _ops.apply_penalties(logits, prompt_tokens, output_tokens, repetition, presence, frequency)


_writes_in_place("apply_penalties")


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Sets logits [B, V] to -inf wherever bitmask int32 [B, ceil(V/32)] has a clear bit (xgrammar's
    layout: bit j of word w is token 32 * w + j); in place."""
    _ops.apply_token_bitmask(logits, bitmask)


_writes_in_place("apply_token_bitmask")


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           seeds: torch.Tensor, offsets: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor) -> None:
    """One token per row (greedy where temperature is 0) and its log-probability under the raw logits."""
    _ops.sample(logits, temperature, top_p, top_k, seeds, offsets, tokens, logprobs)


_writes_in_place("sample")


def _packed_weight_bytes(weight: torch.Tensor, units: int) -> int:
    """packed_bytes() of csrc/common/linear_pack.h: a 64-byte header, then per 16 rows `units` sub-tiles
    (2 for gate_up) of 64-byte lines, a line per K column (fp32) or pair of columns (bf16)."""
    n, k = weight.shape
    lines = math.ceil(k * weight.element_size() / 4)
    return 64 + units * math.ceil(n / 16) * lines * 64


_SCHEME_BITS = {"int8": 8, "int4": 4}


def _quantized_weight_bytes(weight: torch.Tensor, bits: int, group_size: int, units: int) -> int:
    """quant::packed_bytes() of csrc/common/quant.h: a 64-byte header, then per 16 rows, per group of
    K and unit, a params line and the group's q lines (4 K values a line in int8, 8 in int4)."""
    n, k = weight.shape
    if bits == 8:
        group = math.ceil(k / 32) * 32
        k_per_line = 4
    else:
        group = group_size or 32
        k_per_line = 8
    groups = math.ceil(k / group)
    return 64 + math.ceil(n / 16) * groups * units * (1 + group // k_per_line) * 64


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """Packs a CPU [N, K] fp32/bf16 weight (nn.Linear layout) into the tiles `linear` streams (once, at load)."""
    return _ops.pack_linear_weight(weight)


@torch.library.register_fake("mistral_grpc::pack_linear_weight")
def _pack_linear_weight_fake(weight: torch.Tensor) -> torch.Tensor:
    return weight.new_empty(_packed_weight_bytes(weight, 1), dtype=torch.uint8)


def pack_gate_up_weight(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Packs the MLP's gate and up [F, K] weights side by side, for `linear_silu_mul`."""
    return _ops.pack_gate_up_weight(gate, up)


@torch.library.register_fake("mistral_grpc::pack_gate_up_weight")
def _pack_gate_up_weight_fake(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gate.new_empty(_packed_weight_bytes(gate, 2), dtype=torch.uint8)


def unpack_linear_weight(packed: torch.Tensor) -> torch.Tensor:
    """The [N, K] weight back from a packed one ([2F, K] = gate then up for a gate_up pack); from a
    quantized pack, float32 holding exactly the dequantized weights the kernels multiply."""
    return _ops.unpack_linear_weight(packed)


def quantize_linear_weight(weight: torch.Tensor, scheme: str, group_size: int = 0) -> torch.Tensor:
    """Quantizes and packs a CPU [N, K] fp32/bf16 weight for `linear` (csrc/common/quant.h): scheme "int8"
    (symmetric, per output channel; group_size 0) or "int4" (asymmetric groups of group_size 32, 64 or 128
    along K; 0 = 32). x and out keep the weight's dtype; the kernels quantize x per 32 values to int8."""
    return _ops.quantize_linear_weight(weight, scheme, group_size)


@torch.library.register_fake("mistral_grpc::quantize_linear_weight")
def _quantize_linear_weight_fake(weight: torch.Tensor, scheme: str, group_size: int = 0) -> torch.Tensor:
    return weight.new_empty(_quantized_weight_bytes(weight, _SCHEME_BITS[scheme], group_size, 1), dtype=torch.uint8)


def quantize_gate_up_weight(gate: torch.Tensor, up: torch.Tensor, scheme: str, group_size: int = 0) -> torch.Tensor:
    """quantize_linear_weight for the MLP's gate and up [F, K] side by side, for `linear_silu_mul`."""
    return _ops.quantize_gate_up_weight(gate, up, scheme, group_size)


@torch.library.register_fake("mistral_grpc::quantize_gate_up_weight")
def _quantize_gate_up_weight_fake(gate: torch.Tensor, up: torch.Tensor, scheme: str,
                                  group_size: int = 0) -> torch.Tensor:
    return gate.new_empty(_quantized_weight_bytes(gate, _SCHEME_BITS[scheme], group_size, 2), dtype=torch.uint8)


def pack_quantized_weight(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                          activation: torch.dtype) -> torch.Tensor:
    """Packs values quantized elsewhere (a pre-quantized checkpoint) for `linear`: q uint8 [N, K], scale
    (float32 / bfloat16 / float16, stored rounded to fp16) and zero uint8 [N, groups], the weight being
    (q - zero) * scale. bits 8: group_size 0, one group per row; bits 4: group_size 32, 64 or 128 along K,
    q and zero in [0, 15]. activation: the dtype of x and out (float32 or bfloat16)."""
    return _ops.pack_quantized_weight(q, scale, zero, bits, group_size, activation)


@torch.library.register_fake("mistral_grpc::pack_quantized_weight")
def _pack_quantized_weight_fake(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                                activation: torch.dtype) -> torch.Tensor:
    return q.new_empty(_quantized_weight_bytes(q, bits, group_size, 1), dtype=torch.uint8)


def pack_quantized_gate_up_weight(gate_q: torch.Tensor, gate_scale: torch.Tensor, gate_zero: torch.Tensor,
                                  up_q: torch.Tensor, up_scale: torch.Tensor, up_zero: torch.Tensor, bits: int,
                                  group_size: int, activation: torch.dtype) -> torch.Tensor:
    """pack_quantized_weight for the MLP's gate and up [F, K] side by side, for `linear_silu_mul`."""
    return _ops.pack_quantized_gate_up_weight(gate_q, gate_scale, gate_zero, up_q, up_scale, up_zero, bits,
                                              group_size, activation)


@torch.library.register_fake("mistral_grpc::pack_quantized_gate_up_weight")
def _pack_quantized_gate_up_weight_fake(gate_q: torch.Tensor, gate_scale: torch.Tensor, gate_zero: torch.Tensor,
                                        up_q: torch.Tensor, up_scale: torch.Tensor, up_zero: torch.Tensor,
                                        bits: int, group_size: int, activation: torch.dtype) -> torch.Tensor:
    return gate_q.new_empty(_quantized_weight_bytes(gate_q, bits, group_size, 2), dtype=torch.uint8)


# PackedHeader.activation's byte offset and the WeightDtype codes of the activation dtypes
# (csrc/common/linear_pack.h). float16 has one for the CUDA kernels only.
_HEADER_ACTIVATION_OFFSET = 32
_ACTIVATION_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 5}


def with_activation(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A copy of a quantized CPU pack whose x and out are `dtype` (float32, bfloat16, or float16 for CUDA,
    which the CPU quantize ops do not make: quantize the weight from float32, which holds float16 exactly,
    then set float16 here). The weights are unchanged: they are int8 / int4 with fp16 scales whatever x is."""
    if dtype not in _ACTIVATION_CODES:
        raise ValueError(f"activation must be float32, bfloat16 or float16, got {dtype}")
    copy = packed.clone()
    field = copy[_HEADER_ACTIVATION_OFFSET:_HEADER_ACTIVATION_OFFSET + 4].view(torch.int32)
    field.fill_(_ACTIVATION_CODES[dtype])
    return copy


def cuda_quant_math_linear(out: torch.Tensor, x: torch.Tensor, packed_weight: torch.Tensor) -> None:
    """The CUDA quantized GEMV's arithmetic (csrc/common/quant_gemv.h) run on the CPU, for tests without a
    GPU: out = x @ W.T for a plain pack, silu(x @ gate.T) * (x @ up.T) for a gate_up one, weight-only
    (x unquantized, fp32 sums), x and out in the pack's activation dtype. Slow; not a serving path."""
    _ops.cuda_quant_math_linear(out, x, packed_weight)


_writes_in_place("cuda_quant_math_linear")


def cuda_quant_math_dequantize(packed_weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense [units * N, K] weight in `dtype` (the pack's activation dtype) that the CUDA prefill path
    dequantizes a quantized pack into and multiplies with cuBLAS, computed on the CPU with the same code.
    (No fake kernel: the shape is in the pack's header.)"""
    return _ops.cuda_quant_math_dequantize(packed_weight, dtype)


def linear(out: torch.Tensor, x: torch.Tensor, packed_weight: torch.Tensor,
           prompt_rows: int = KERNELS_BY_BATCH_SIZE) -> None:
    """out [T, N] = x [T, K] @ W.T, fp32 accumulation; x, out in the weight's dtype. CPU: any pack; CUDA:
    quantized packs moved there (float weights stay dense for cuBLAS), prompt_rows checked but unused.
    prompt_rows -1: the kernels go by T (the weight streamed for small T; batches of 7 rows and more in
    bf16, 80 in fp32, on AMX where the CPU has it). prompt_rows >= 0: rows [0, prompt_rows) run on AMX
    where the CPU has it, the others (decode rows) on the vector kernels in fp32 and on AMX in bf16, so
    each row's result depends only on its own values and side, never on the rest of the batch."""
    _ops.linear(out, x, packed_weight, prompt_rows)


_writes_in_place("linear")


def linear_silu_mul(out: torch.Tensor, x: torch.Tensor, packed_gate_up: torch.Tensor,
                    prompt_rows: int = KERNELS_BY_BATCH_SIZE) -> None:
    """out [T, F] = silu(x @ gate.T) * (x @ up.T) in one pass over the packed gate_up weight; prompt_rows
    as for `linear`."""
    _ops.linear_silu_mul(out, x, packed_gate_up, prompt_rows)


_writes_in_place("linear_silu_mul")


def decoder_layer(hidden: torch.Tensor, residual: torch.Tensor, input_norm: torch.Tensor,
                  post_attention_norm: torch.Tensor, qkv_weight: torch.Tensor, o_weight: torch.Tensor,
                  gate_up_weight: torch.Tensor, down_weight: torch.Tensor, key_cache: torch.Tensor,
                  value_cache: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                  cos_sin_cache: torch.Tensor, eps: float, scale: float, sliding_window: int,
                  prompt_rows: int = KERNELS_BY_BATCH_SIZE) -> None:
    """One decoder layer on CPU packed weights (pack_linear_weight: qkv, o, down; pack_gate_up_weight),
    in place: residual += hidden; hidden = the layer's MLP output; the new k/v go into the caches.
    The ops above chained in C++, without a Python round trip between them; prompt_rows as for `linear`."""
    _ops.decoder_layer(hidden, residual, input_norm, post_attention_norm, qkv_weight, o_weight, gate_up_weight,
                       down_weight, key_cache, value_cache, positions, slot_mapping, block_tables, seq_lens,
                       query_start_loc, cos_sin_cache, eps, scale, sliding_window, prompt_rows)


_writes_in_place("decoder_layer")


def read_bandwidth(buffer: torch.Tensor, repeats: int) -> float:
    """Best GB/s of `repeats` reads of a CPU buffer on all intra-op threads, with the linear kernels' load loop."""
    return _ops.read_bandwidth(buffer, repeats)


def linear_cpu_isa(isa: str = "") -> str:
    """The kernels the CPU linear ops use; a name (portable, avx2, avx512, avx512_bf16, amx, best) selects
    a level up to the CPU's best (tests run each). Below "amx", bf16 prefill attention leaves AMX too."""
    return _ops.linear_cpu_isa(isa)


def zeroed_bytes(nbytes: int) -> torch.Tensor:
    """A zeroed uint8 CPU tensor [nbytes]; from 2 MiB on it starts on a 2 MiB boundary of a private
    mapping advised for transparent huge pages, faulted in page by page on first touch."""
    return _ops.zeroed_bytes(nbytes)


@torch.library.register_fake("mistral_grpc::zeroed_bytes")
def _zeroed_bytes_fake(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)
