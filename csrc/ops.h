// Shared host-side declarations for the mistral_grpc ops: the argument checks that the CPU and
// CUDA implementations of one schema both call, so a bad call fails the same way on either device.
#pragma once

#include <ATen/core/Tensor.h>

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

// Sampling ops (defined in cpu/sampling.cpp).
void check_apply_penalties_args(const at::Tensor& logits, const at::Tensor& prompt_tokens,
                                const at::Tensor& output_tokens, const at::Tensor& repetition,
                                const at::Tensor& presence, const at::Tensor& frequency);
void check_sample_args(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_p,
                       const at::Tensor& top_k, const at::Tensor& seeds, const at::Tensor& offsets,
                       const at::Tensor& tokens, const at::Tensor& logprobs);

// Structured output (defined in cpu/token_bitmask.cpp).
void check_apply_token_bitmask_args(const at::Tensor& logits, const at::Tensor& bitmask);

// Quantized linear ops on a pack the host cannot read (CUDA; defined at the end of checks.cpp): x [T, K]
// and out [T, N] of one float dtype with unit stride along K / N, a 1-D contiguous 16-byte-aligned uint8
// pack on their device whose size is that of some int8 / int4 pack of `units` [N, K] matrices (the kernels
// check its header against the shapes), prompt_rows -1 or in [0, T].
void check_quantized_linear_args(const char* op, const at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                                 int64_t units, int64_t prompt_rows);

}  // namespace mistral_grpc
