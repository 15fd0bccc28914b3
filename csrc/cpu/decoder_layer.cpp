// decoder_layer on CPU: one Mistral decoder layer over the packed weights, as one op.
//
// It chains the CPU implementations of the layer's ops, each with its own argument checks, exactly
// as the Python decoder chains them through torch.ops on other devices (model/decoder.py), so the
// two agree bit for bit. The point is what the chain leaves out: a batch-1 decode step streams every
// weight through the caches, which evicts the interpreter and the dispatcher, and the ~15 Python
// round trips per layer between the linear calls then run from DRAM.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/ops_cpu.h"
#include "ops.h"

namespace mistral_grpc {
namespace {

void decoder_layer_cpu(at::Tensor& hidden, at::Tensor& residual, const at::Tensor& input_norm,
                       const at::Tensor& post_attention_norm, const at::Tensor& qkv_weight,
                       const at::Tensor& o_weight, const at::Tensor& gate_up_weight, const at::Tensor& down_weight,
                       at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& positions,
                       const at::Tensor& slot_mapping, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                       const at::Tensor& query_start_loc, const at::Tensor& cos_sin_cache, double eps, double scale,
                       int64_t sliding_window, int64_t prompt_rows) {
  const DecoderLayerShape shape =
      check_decoder_layer_args(hidden, key_cache, qkv_weight, o_weight, gate_up_weight, down_weight);
  const int64_t tokens = shape.tokens, hidden_size = shape.hidden_size;
  const int64_t num_kv_heads = shape.num_kv_heads, head_dim = shape.head_dim;
  const int64_t kv_size = shape.kv_size, q_size = shape.q_size, qkv_size = shape.qkv_size, ffn = shape.ffn;

  const at::TensorOptions options = hidden.options();
  at::Tensor qkv = at::empty({tokens, qkv_size}, options);
  at::Tensor q = qkv.narrow(1, 0, q_size).view({tokens, q_size / head_dim, head_dim});
  at::Tensor k = qkv.narrow(1, q_size, kv_size).view({tokens, num_kv_heads, head_dim});
  const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({tokens, num_kv_heads, head_dim});
  at::Tensor attention = at::empty({tokens, q_size / head_dim, head_dim}, options);
  at::Tensor attended = at::empty({tokens, hidden_size}, options);
  at::Tensor activated = at::empty({tokens, ffn}, options);
  // Every argument is checked before the first write, so a bad call changes nothing. (Each op
  // checks again: a few microseconds against a layer's weights streaming.)
  check_fused_add_rms_norm_args(hidden, residual, input_norm);
  check_fused_add_rms_norm_args(attended, residual, post_attention_norm);
  check_rotary_embedding_args(positions, q, k, cos_sin_cache);
  check_positions_in_range(positions, cos_sin_cache.size(0));
  check_reshape_and_cache_args(k, v, key_cache, value_cache, slot_mapping);
  check_slots_in_range(slot_mapping, key_cache.size(0) * key_cache.size(1));
  check_paged_attention_args(attention, q, key_cache, value_cache, block_tables, seq_lens, query_start_loc);
  check_attention_metadata(block_tables, seq_lens, query_start_loc, tokens, key_cache.size(0), key_cache.size(1),
                           sliding_window);
  check_prompt_rows("decoder_layer", prompt_rows, tokens);

  fused_add_rms_norm_cpu(hidden, residual, input_norm, eps);
  linear_cpu(qkv, hidden, qkv_weight, prompt_rows);
  rotary_embedding_cpu(positions, q, k, cos_sin_cache);
  reshape_and_cache_cpu(k, v, key_cache, value_cache, slot_mapping);
  paged_attention_cpu(attention, q, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
                      sliding_window);
  linear_cpu(attended, attention.view({tokens, q_size}), o_weight, prompt_rows);
  fused_add_rms_norm_cpu(attended, residual, post_attention_norm, eps);
  linear_silu_mul_cpu(activated, attended, gate_up_weight, prompt_rows);
  linear_cpu(hidden, activated, down_weight, prompt_rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(mistral_grpc, CPU, m) { m.impl("decoder_layer", &decoder_layer_cpu); }

}  // namespace mistral_grpc
