"""The Mistral decoder: Hugging Face weights run layer by layer on the extension's ops.

One forward step takes a packed batch (prompts, prompt chunks and decode tokens side by side), writes the
new tokens' keys and values into the paged cache and returns next-token logits for each sequence.
The arithmetic follows transformers' MistralForCausalLM step for step (rounding included), so the two
agree to float32 round-off.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mistral_grpc import ops
from mistral_grpc.memory import zeros_on_huge_pages
from mistral_grpc.model.config import DTYPES, MistralConfig
from mistral_grpc.model.linear import GateUpSilu, Linear, check_prequantized, check_quantization
from mistral_grpc.model.weights import LayerWeights, MistralWeights, load_weights

@dataclass
class BatchInput:
    """One step's packed batch, on the model's device. Each sequence contributes a chunk of new tokens
    (a prompt, part of one, or one decode token) placed after the tokens it already has in the cache."""

    token_ids: torch.Tensor  # int64 [T]: every sequence's new tokens, back to back
    positions: torch.Tensor  # int64 [T]: each token's position in its sequence
    slot_mapping: torch.Tensor  # int64 [T]: cache slot (block * block_size + offset) of each token's k/v
    block_tables: torch.Tensor  # int32 [B, max_blocks]: each sequence's cache blocks, in order, padded
    seq_lens: torch.Tensor  # int32 [B]: tokens in the cache after this step, this step's included
    query_start_loc: torch.Tensor  # int32 [B + 1]: sequence b owns tokens query_start_loc[b]:[b + 1]; >= 1 each
    # Tokens [0, prompt_rows) are prompt tokens, the rest decode tokens, each side on kernels that give
    # a row the same result whatever else is in the batch (ops.linear); ops.KERNELS_BY_BATCH_SIZE: no split.
    prompt_rows: int = ops.KERNELS_BY_BATCH_SIZE
    # int64 [R]: the token rows whose logits forward() returns; None: each sequence's last token.
    logits_rows: torch.Tensor | None = None

@dataclass
class KVCache:
    """Per-layer key and value caches, each [num_blocks, block_size, Hkv, D] in the model's dtype."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

class _Layer:
    """One decoder layer's norms and projections; on CPU each projection holds only its packed (or
    quantized) copy."""

    def __init__(self, weights: LayerWeights, quantization: str = "none") -> None:
        self.input_norm = weights.input_norm
        self.post_attention_norm = weights.post_attention_norm
        # Projections to be quantized, and a pre-quantized checkpoint's, are read on the CPU: their packs go
        # where the norms are.
        device = weights.input_norm.device
        self.qkv_proj = Linear.from_weight(weights.qkv, quantization, device)
        self.o_proj = Linear.from_weight(weights.o_proj, quantization, device)
        gate, up = weights.gate_up.chunk(2)
        self.gate_up_silu = GateUpSilu.from_weights(gate, up, quantization, device)
        self.down_proj = Linear.from_weight(weights.down_proj, quantization, device)
        # Packed on the CPU (float32 / bfloat16): the whole layer runs as one op, ops.decoder_layer.
        self.packed = self.qkv_proj.packed is not None and device.type == "cpu"

class MistralDecoder:
    def __init__(self, config: MistralConfig, weights: MistralWeights, quantization: str = "none") -> None:
        """weights.layers: LayerWeights, or layers from_dir built as they were read. quantization: a
        scheme of QUANTIZATION_SCHEMES for every linear layer (the LM head at least int8); each projection
        checks that its kernels exist as it is quantized."""
        self.config = config
        self.device = weights.embed_tokens.device
        self.dtype = weights.embed_tokens.dtype
        self.quantization = quantization
        self.embed_tokens = weights.embed_tokens
        # Packing copies each weight: take the loaded layers one at a time and let each dense copy
        # go as soon as its packed one exists, so loading never holds two copies of the model.
        self.layers = []
        while weights.layers:
            layer = weights.layers.pop(0)
            self.layers.append(layer if isinstance(layer, _Layer) else _Layer(layer, quantization))
        self.norm = weights.norm
        # The LM head picks the token: int4 rounding there costs more than it saves.
        self.lm_head = Linear.from_weight(weights.lm_head, "int8" if quantization == "int4" else quantization,
                                          self.device)
        weights.lm_head = None
        self.cos_sin_cache = _cos_sin_cache(config, self.dtype, self.device)
        self.scale = config.head_dim ** -0.5  # as transformers writes it, so rounding matches
        self.sliding_window = config.sliding_window or 0

    @classmethod
    def from_dir(cls, path: str | os.PathLike, device: torch.device | str = "cpu",
                 dtype: torch.dtype | str | None = None, quantization: str = "none") -> "MistralDecoder":
        """Loads a Hugging Face model directory; dtype None (or "auto") keeps config.json's torch_dtype
        (bfloat16 for a pre-quantized float16 one: the CPU's quantized kernels run float32 or bfloat16).
        Each layer is packed (quantized) as soon as it is read, so loading holds the packed model and
        one layer in `dtype`, never the whole model in `dtype`. A pre-quantized checkpoint (detected from
        its quantization_config) is packed as it was quantized; `quantization` must then be "none"."""
        config = MistralConfig.from_dir(path)
        dtype = _resolve_dtype(dtype, config)
        if config.quantization is None:
            check_quantization(quantization, device, dtype)
        else:
            check_prequantized(config.quantization, quantization, device, dtype)
        # Projections to be quantized are read on the CPU, where the quantize ops run.
        weights = load_weights(path, config, dtype, device, prepare_layer=lambda layer: _Layer(layer, quantization),
                               projection_device="cpu" if quantization != "none" else device)
        return cls(config, weights, quantization)

    @property
    def quantization_description(self) -> str:
        """The weights' quantization for the startup log: the --quantization scheme, or a pre-quantized
        checkpoint's method, bits and group size."""
        prequantized = self.config.quantization
        return self.quantization if prequantized is None else prequantized.describe()

    @property
    def weight_bytes(self) -> int:
        """The bytes the weights take in memory (the embedding, norms and every packed projection)."""
        projections = [self.lm_head] + [p for layer in self.layers
                                        for p in (layer.qkv_proj, layer.o_proj, layer.gate_up_silu, layer.down_proj)]
        norms = [self.norm] + [n for layer in self.layers for n in (layer.input_norm, layer.post_attention_norm)]
        tied = self.lm_head.weight is not None and self.lm_head.weight.data_ptr() == self.embed_tokens.data_ptr()
        return (sum(p.nbytes for p in projections) + sum(n.nbytes for n in norms)
                + (0 if tied else self.embed_tokens.nbytes))

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> KVCache:
        shape = (num_blocks, block_size, self.config.num_key_value_heads, self.config.head_dim)

        def zeros() -> list[torch.Tensor]:
            # On CPU the cache is resident from the start, as it is on a GPU: its memory is the
            # server's from startup (not an out-of-memory kill mid-stream), and no decode step pays
            # for the first touch of fresh pages as sequences grow into them. Huge pages:
            # attention reads each sequence's blocks scattered over the cache.
            if self.device.type == "cpu":
                return [zeros_on_huge_pages(shape, self.dtype, populate=True) for _ in self.layers]
            return [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]

        return KVCache(keys=zeros(), values=zeros())

    @torch.inference_mode()
    def forward(self, batch: BatchInput, kv_cache: KVCache) -> torch.Tensor:
        """Logits [B, V] in float32 for the last new token of each sequence of the batch (or [R, V] for
        batch.logits_rows)."""
        eps = self.config.rms_norm_eps
        hidden = F.embedding(batch.token_ids, self.embed_tokens)
        # Each layer starts with residual += hidden: from zeros, the first leaves the embeddings exact.
        residual = torch.zeros_like(hidden)
        for layer, key_cache, value_cache in zip(self.layers, kv_cache.keys, kv_cache.values):
            if layer.packed:
                ops.decoder_layer(hidden, residual, layer.input_norm, layer.post_attention_norm,
                                  layer.qkv_proj.packed, layer.o_proj.packed, layer.gate_up_silu.packed,
                                  layer.down_proj.packed, key_cache, value_cache, batch.positions,
                                  batch.slot_mapping, batch.block_tables, batch.seq_lens, batch.query_start_loc,
                                  self.cos_sin_cache, eps, self.scale, self.sliding_window, batch.prompt_rows)
            else:
                hidden = self._layer(layer, hidden, residual, batch, key_cache, value_cache)

        # Only the rows whose logits are wanted (each sequence's last token unless the batch says) need
        # the last residual add, the final norm and the lm_head (in a batch of decode tokens alone,
        # every token is one).
        if batch.logits_rows is not None:
            hidden, residual = hidden[batch.logits_rows], residual[batch.logits_rows]
        elif hidden.shape[0] != batch.seq_lens.shape[0]:
            last = (batch.query_start_loc[1:] - 1).long()
            hidden, residual = hidden[last], residual[last]
        ops.fused_add_rms_norm(hidden, residual, self.norm, eps)
        # The LM head's rows are the sequences' last tokens: all decode-side (0) unless the batch is unsplit.
        lm_head_prompt_rows = ops.KERNELS_BY_BATCH_SIZE if batch.prompt_rows == ops.KERNELS_BY_BATCH_SIZE else 0
        return self.lm_head(hidden, prompt_rows=lm_head_prompt_rows).float()

    def _layer(self, layer: _Layer, hidden: torch.Tensor, residual: torch.Tensor, batch: BatchInput,
               key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
        """What ops.decoder_layer does, op by op, for weights it cannot take (CUDA; float16 on CPU)."""
        eps = self.config.rms_norm_eps
        ops.fused_add_rms_norm(hidden, residual, layer.input_norm, eps)
        hidden = self._attention(layer, hidden, batch, key_cache, value_cache)
        ops.fused_add_rms_norm(hidden, residual, layer.post_attention_norm, eps)
        return layer.down_proj(layer.gate_up_silu(hidden))

    def _attention(self, layer: _Layer, hidden: torch.Tensor, batch: BatchInput, key_cache: torch.Tensor,
                   value_cache: torch.Tensor) -> torch.Tensor:
        config = self.config
        tokens = hidden.shape[0]
        q, k, v = layer.qkv_proj(hidden).split([config.q_size, config.kv_size, config.kv_size], dim=-1)
        # Views into the fused qkv output: the ops need each token's [heads, head_dim] block contiguous, no more.
        q = q.view(tokens, config.num_attention_heads, config.head_dim)
        k = k.view(tokens, config.num_key_value_heads, config.head_dim)
        v = v.view(tokens, config.num_key_value_heads, config.head_dim)
        ops.rotary_embedding(batch.positions, q, k, self.cos_sin_cache)
        ops.reshape_and_cache(k, v, key_cache, value_cache, batch.slot_mapping)
        out = torch.empty_like(q)
        ops.paged_attention(out, q, key_cache, value_cache, batch.block_tables, batch.seq_lens,
                            batch.query_start_loc, self.scale, self.sliding_window)
        return layer.o_proj(out.view(tokens, config.q_size))

def _cos_sin_cache(config: MistralConfig, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[max_pos, D]: cos then sin, computed in float32 as transformers does, then cast to the model's dtype
    (transformers casts them to the activations' dtype before rotating)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(config.max_position_embeddings, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device=device, dtype=dtype)

def _resolve_dtype(dtype: torch.dtype | str | None, config: MistralConfig) -> torch.dtype:
    if dtype is None or dtype == "auto":
        if config.quantization is not None and config.torch_dtype == torch.float16:
            return torch.bfloat16
        return config.torch_dtype
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
    return dtype
