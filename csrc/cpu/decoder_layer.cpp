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

#include <string>

#include "cpu/ops_cpu.h"
#include "ops.h"

namespace mistral_grpc {
namespace {

// A packed weight of the kind the layer needs at `name`, [n, k] (n < 0: any), in the layer's dtype.
PackedWeightShape check_weight(const at::Tensor& packed, const char* name, bool gate_up, int64_t n, int64_t k,
                               at::ScalarType dtype) {
  const PackedWeightShape shape = packed_weight_shape(packed, "decoder_layer");
  TORCH_CHECK(shape.gate_up == gate_up, "decoder_layer: ", name, " must come from ",
              gate_up ? "pack_gate_up_weight" : "pack_linear_weight");
  TORCH_CHECK((n < 0 || shape.n == n) && shape.k == k && shape.dtype == dtype, "decoder_layer: ", name, " must be [",
              n < 0 ? "N" : std::to_string(n), ", ", k, "] ", dtype, ", got [", shape.n, ", ", shape.k, "] ",
              shape.dtype);
  return shape;
}

void decoder_layer_cpu(at::Tensor& hidden, at::Tensor& residual, const at::Tensor& input_norm,
                       const at::Tensor& post_attention_norm, const at::Tensor& qkv_weight,
                       const at::Tensor& o_weight, const at::Tensor& gate_up_weight, const at::Tensor& down_weight,
                       at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& positions,
                       const at::Tensor& slot_mapping, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                       const at::Tensor& query_start_loc, const at::Tensor& cos_sin_cache, double eps, double scale,
                       int64_t sliding_window, int64_t prompt_rows) {
  TORCH_CHECK(hidden.dim() == 2, "decoder_layer: hidden must be [T, hidden_size], got ", hidden.sizes());
  TORCH_CHECK(key_cache.dim() == 4, "decoder_layer: key_cache must be [num_blocks, block_size, Hkv, D], got ",
              key_cache.sizes());
  const int64_t tokens = hidden.size(0), hidden_size = hidden.size(1);
  const int64_t num_kv_heads = key_cache.size(2), head_dim = key_cache.size(3);
  const int64_t kv_size = num_kv_heads * head_dim;
  // The packed qkv weight's N is (Hq + 2 Hkv) * D: it gives the query heads.
  const int64_t qkv_size = check_weight(qkv_weight, "qkv_weight", false, -1, hidden_size, hidden.scalar_type()).n;
  const int64_t q_size = qkv_size - 2 * kv_size;
  TORCH_CHECK(head_dim > 0 && q_size > 0 && q_size % (head_dim * num_kv_heads) == 0, "decoder_layer: the qkv weight's ",
              qkv_size, " outputs are not (Hq + 2 * ", num_kv_heads, ") * ", head_dim, " for the cache's Hkv and D");
  check_weight(o_weight, "o_weight", false, hidden_size, q_size, hidden.scalar_type());
  const int64_t ffn = check_weight(gate_up_weight, "gate_up_weight", true, -1, hidden_size, hidden.scalar_type()).n;
  check_weight(down_weight, "down_weight", false, hidden_size, ffn, hidden.scalar_type());

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
  TORCH_CHECK(prompt_rows >= -1 && prompt_rows <= tokens, "decoder_layer: prompt_rows must be -1 or in [0, ", tokens,
              "], got ", prompt_rows);

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
