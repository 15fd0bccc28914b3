// Shared host-side declarations for the mistral_grpc ops: their argument checks (defined in
// checks.cpp). The CPU and CUDA implementations of one schema both call its check, so a bad call
// fails the same way on either device; the CPU-only ops (linear layers, decoder_layer) check theirs
// there too.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <vector>

#include "common/linear_pack.h"

namespace mistral_grpc {

// Decoder layer ops (defined in checks.cpp). Shapes, dtypes, devices and layouts: they never read
// tensor data, so they cost nothing on CUDA.
void check_rms_norm_args(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight);
void check_fused_add_rms_norm_args(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight);
void check_rotary_embedding_args(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& cos_sin_cache);
void check_silu_and_mul_args(const at::Tensor& out, const at::Tensor& gate_up);
void check_reshape_and_cache_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& slot_mapping);
void check_paged_attention_args(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& block_tables,
                                const at::Tensor& seq_lens, const at::Tensor& query_start_loc);

// Checks of the index values themselves, for host tensors: the CPU kernels call them before touching
// memory. The CUDA kernels cannot read device metadata without a sync; they bound every index they
// read instead and write NaN (attention, rotary) or skip the write (cache) where one is out of range.
void check_positions_in_range(const at::Tensor& positions, int64_t max_position);
void check_slots_in_range(const at::Tensor& slot_mapping, int64_t num_slots);
void check_attention_metadata(const at::Tensor& block_tables, const at::Tensor& seq_lens,
                              const at::Tensor& query_start_loc, int64_t num_tokens, int64_t num_blocks,
                              int64_t block_size, int64_t sliding_window);

// Sampling ops and structured output. Every op that takes logits checks them with check_logits:
// a contiguous 2-D [B, V] tensor of float32, bfloat16 or float16.
void check_logits(const char* op, const at::Tensor& logits);
void check_apply_penalties_args(const at::Tensor& logits, const at::Tensor& prompt_tokens,
                                const at::Tensor& output_tokens, const at::Tensor& repetition,
                                const at::Tensor& presence, const at::Tensor& frequency);
void check_sample_args(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_p,
                       const at::Tensor& top_k, const at::Tensor& seeds, const at::Tensor& offsets,
                       const at::Tensor& tokens, const at::Tensor& logprobs);
void check_apply_token_bitmask_args(const at::Tensor& logits, const at::Tensor& bitmask);

// Linear layers on CPU packs (CUDA runs a float weight as is, a quantized pack below). The dtype of x
// and out for a packed weight of the given activation WeightDtype (float32 or bfloat16).
at::ScalarType torch_dtype(linear::WeightDtype dtype);
void check_pack_linear_weight_args(const at::Tensor& weight);
void check_pack_gate_up_weight_args(const at::Tensor& gate, const at::Tensor& up);
void check_quantize_linear_weight_args(const at::Tensor& weight, c10::string_view scheme, int64_t group_size);
void check_quantize_gate_up_weight_args(const at::Tensor& gate, const at::Tensor& up, c10::string_view scheme,
                                        int64_t group_size);
// One unit (weight; gate or up) of values quantized elsewhere: q uint8 [N, K] and, per row and
// group of K, a scale and a zero point; the weight is (q - zero) * scale.
struct QuantizedUnit {
  const char* name;
  at::Tensor q, scale, zero;
};
// pack_quantized_weight / pack_quantized_gate_up_weight (`op`): bits, group_size and activation,
// and every unit's tensors and values (units of one shape).
void check_pack_quantized_args(const char* op, const std::vector<QuantizedUnit>& units, int64_t bits,
                               int64_t group_size, at::ScalarType activation);
// A packed weight of any kind (a uint8 CPU tensor whose header matches its size); returns the header.
linear::PackedHeader check_packed_weight(const char* op, const at::Tensor& packed);
// linear / linear_silu_mul (`op`): x and out against the packed weight's header, of the op's kind.
void check_linear_args(const char* op, const at::Tensor& out, const at::Tensor& x, const linear::PackedHeader& header,
                       linear::PackKind kind, int64_t prompt_rows);
// prompt_rows of an op over `rows` rows: -1 (none) or a count of them.
void check_prompt_rows(const char* op, int64_t prompt_rows, int64_t rows);
void check_read_bandwidth_args(const at::Tensor& buffer, int64_t repeats);

// decoder_layer (CPU only): hidden, the key cache's shape and the packed weights, and the layer's
// sizes they give. The layer's ops' own checks follow on the tensors it derives.
struct DecoderLayerShape {
  int64_t tokens, hidden_size, num_kv_heads, head_dim;
  int64_t kv_size, q_size, qkv_size;  // k's (and v's) and q's outputs of the qkv weight, and all of them
  int64_t ffn;                        // the gate_up weight's F
};
DecoderLayerShape check_decoder_layer_args(const at::Tensor& hidden, const at::Tensor& key_cache,
                                           const at::Tensor& qkv_weight, const at::Tensor& o_weight,
                                           const at::Tensor& gate_up_weight, const at::Tensor& down_weight);

// Quantized linear ops on a pack the host cannot read (CUDA): x [T, K]
// and out [T, N] of one float dtype with unit stride along K / N, a 1-D contiguous 16-byte-aligned uint8
// pack on their device whose size is that of some int8 / int4 pack of `units` [N, K] matrices (the kernels
// check its header against the shapes), prompt_rows -1 or in [0, T].
void check_quantized_linear_args(const char* op, const at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                                 int64_t units, int64_t prompt_rows);

}  // namespace mistral_grpc
