// Argument checks shared by the CPU and CUDA implementations of the decoder layer ops: every bad
// call ends in a TORCH_CHECK that names the op and the argument, never in a crash or a wrong answer.
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "common/attention.h"
#include "common/quant_gemv.h"
#include "ops.h"

namespace mistral_grpc {
namespace {

bool is_float_dtype(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

void check_same_device(const char* op, const at::Tensor& reference, const char* reference_name, const at::Tensor& t,
                       const char* name) {
  TORCH_CHECK(t.device() == reference.device(), op, ": ", name, " is on ", t.device(), " but ", reference_name,
              " is on ", reference.device(), "; all tensors must be on one device");
}

void check_index_vector(const char* op, const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t length) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == length, op, ": ", name, " must have shape [", length, "], got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// [T, H, D] with each token's H x D contiguous; tokens may sit at any (non-overlapping) stride, so a
// slice of a fused qkv projection is accepted without a copy.
void check_token_rows(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be [tokens, heads, head_dim], got shape ", t.sizes());
  const bool rows_contiguous = (t.size(2) <= 1 || t.stride(2) == 1) && (t.size(1) <= 1 || t.stride(1) == t.size(2));
  const bool tokens_disjoint = t.size(0) <= 1 || t.stride(0) >= t.size(1) * t.size(2);
  TORCH_CHECK(rows_contiguous && tokens_disjoint, op, ": each token of ", name,
              " must be a contiguous [heads, head_dim] block (strides ", t.strides(), ")");
}

void check_cache(const char* op, const at::Tensor& cache, const char* name) {
  TORCH_CHECK(cache.dim() == 4, op, ": ", name, " must be [num_blocks, block_size, num_kv_heads, head_dim], got ",
              cache.sizes());
  TORCH_CHECK(cache.is_contiguous(), op, ": ", name, " must be contiguous");
}

}  // namespace

void check_rms_norm_args(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(is_float_dtype(x), "rms_norm: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && x.size(-1) == weight.size(0), "rms_norm: x's last dim (",
              x.dim() >= 1 ? x.size(-1) : 0, ") must equal weight's size (", weight.sizes(), ")");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(),
              "rms_norm: out, x and weight must share a dtype, got ", out.scalar_type(), ", ", x.scalar_type(),
              ", ", weight.scalar_type());
  TORCH_CHECK(out.sizes() == x.sizes(), "rms_norm: out must have x's shape ", x.sizes(), ", got ", out.sizes());
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && out.is_contiguous(),
              "rms_norm: out, x and weight must be contiguous");
  check_same_device("rms_norm", x, "x", weight, "weight");
  check_same_device("rms_norm", x, "x", out, "out");
}

void check_fused_add_rms_norm_args(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight) {
  const char* op = "fused_add_rms_norm";
  TORCH_CHECK(is_float_dtype(x), op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && x.size(-1) == weight.size(0), op, ": x's last dim (",
              x.dim() >= 1 ? x.size(-1) : 0, ") must equal weight's size (", weight.sizes(), ")");
  TORCH_CHECK(residual.sizes() == x.sizes(), op, ": residual must have x's shape ", x.sizes(), ", got ",
              residual.sizes());
  TORCH_CHECK(residual.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(), op,
              ": x, residual and weight must share a dtype, got ", x.scalar_type(), ", ", residual.scalar_type(),
              ", ", weight.scalar_type());
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous(), op,
              ": x, residual and weight must be contiguous");
  TORCH_CHECK(!x.is_same(residual), op, ": x and residual must be different tensors");
  check_same_device(op, x, "x", residual, "residual");
  check_same_device(op, x, "x", weight, "weight");
}

void check_rotary_embedding_args(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& cos_sin_cache) {
  const char* op = "rotary_embedding";
  check_token_rows(op, q, "q");
  check_token_rows(op, k, "k");
  TORCH_CHECK(is_float_dtype(q) && k.scalar_type() == q.scalar_type(), op,
              ": q and k must share a float dtype, got ", q.scalar_type(), " and ", k.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2), op, ": q ", q.sizes(), " and k ", k.sizes(),
              " must have the same number of tokens and head_dim");
  TORCH_CHECK(q.size(2) % 2 == 0, op, ": head_dim must be even, got ", q.size(2));
  check_index_vector(op, positions, "positions", at::kLong, q.size(0));
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.size(0) > 0 && cos_sin_cache.size(1) == q.size(2), op,
              ": cos_sin_cache must be [max_position > 0, head_dim=", q.size(2), "], got ", cos_sin_cache.sizes());
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat || cos_sin_cache.scalar_type() == q.scalar_type(), op,
              ": cos_sin_cache must be float32 or q's dtype, got ", cos_sin_cache.scalar_type());
  TORCH_CHECK(cos_sin_cache.is_contiguous(), op, ": cos_sin_cache must be contiguous");
  check_same_device(op, q, "q", k, "k");
  check_same_device(op, q, "q", positions, "positions");
  check_same_device(op, q, "q", cos_sin_cache, "cos_sin_cache");
}

void check_silu_and_mul_args(const at::Tensor& out, const at::Tensor& gate_up) {
  const char* op = "silu_and_mul";
  TORCH_CHECK(is_float_dtype(gate_up), op, ": gate_up must be float32, bfloat16 or float16, got ",
              gate_up.scalar_type());
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, op, ": gate_up's last dim must be even (gate | up), ",
              "got shape ", gate_up.sizes());
  auto expected = gate_up.sizes().vec();
  expected.back() /= 2;
  TORCH_CHECK(out.sizes() == at::IntArrayRef(expected), op, ": out must have shape ", at::IntArrayRef(expected),
              ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == gate_up.scalar_type(), op, ": out must have gate_up's dtype ",
              gate_up.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK(out.is_contiguous() && gate_up.is_contiguous(), op, ": out and gate_up must be contiguous");
  check_same_device(op, gate_up, "gate_up", out, "out");
}

void check_reshape_and_cache_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  const char* op = "reshape_and_cache";
  check_token_rows(op, k, "k");
  check_token_rows(op, v, "v");
  check_cache(op, k_cache, "k_cache");
  check_cache(op, v_cache, "v_cache");
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v ", v.sizes(), " must have k's shape ", k.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache ", v_cache.sizes(), " must have k_cache's shape ",
              k_cache.sizes());
  TORCH_CHECK(k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3), op, ": k is ", k.sizes(),
              " but the cache holds [num_kv_heads=", k_cache.size(2), ", head_dim=", k_cache.size(3), "] per token");
  TORCH_CHECK(is_float_dtype(k) && v.scalar_type() == k.scalar_type() && k_cache.scalar_type() == k.scalar_type() &&
                  v_cache.scalar_type() == k.scalar_type(),
              op, ": k, v and the caches must share a float dtype, got ", k.scalar_type(), ", ", v.scalar_type(), ", ",
              k_cache.scalar_type(), ", ", v_cache.scalar_type());
  check_index_vector(op, slot_mapping, "slot_mapping", at::kLong, k.size(0));
  check_same_device(op, k_cache, "k_cache", k, "k");
  check_same_device(op, k_cache, "k_cache", v, "v");
  check_same_device(op, k_cache, "k_cache", v_cache, "v_cache");
  check_same_device(op, k_cache, "k_cache", slot_mapping, "slot_mapping");
}

void check_paged_attention_args(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& block_tables,
                                const at::Tensor& seq_lens, const at::Tensor& query_start_loc) {
  const char* op = "paged_attention";
  check_token_rows(op, q, "q");
  check_token_rows(op, out, "out");
  check_cache(op, k_cache, "k_cache");
  check_cache(op, v_cache, "v_cache");
  TORCH_CHECK(out.sizes() == q.sizes(), op, ": out ", out.sizes(), " must have q's shape ", q.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache ", v_cache.sizes(), " must have k_cache's shape ",
              k_cache.sizes());
  TORCH_CHECK(k_cache.size(1) > 0, op, ": the cache's block_size must be positive");
  TORCH_CHECK(is_float_dtype(q) && out.scalar_type() == q.scalar_type() && k_cache.scalar_type() == q.scalar_type() &&
                  v_cache.scalar_type() == q.scalar_type(),
              op, ": out, q and the caches must share a float dtype, got ", out.scalar_type(), ", ", q.scalar_type(),
              ", ", k_cache.scalar_type(), ", ", v_cache.scalar_type());
  const int64_t num_q_heads = q.size(1), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(q.size(2) == k_cache.size(3), op, ": q's head_dim (", q.size(2), ") differs from the cache's (",
              k_cache.size(3), ")");
  TORCH_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0, op, ": q's ", num_q_heads,
              " heads are not a multiple of the cache's ", num_kv_heads, " kv heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.is_contiguous(), op,
              ": block_tables must be a contiguous int32 [num_seqs, max_blocks], got ", block_tables.scalar_type(), " ",
              block_tables.sizes());
  const int64_t num_seqs = block_tables.size(0);
  check_index_vector(op, seq_lens, "seq_lens", at::kInt, num_seqs);
  check_index_vector(op, query_start_loc, "query_start_loc", at::kInt, num_seqs + 1);
  check_same_device(op, q, "q", out, "out");
  check_same_device(op, q, "q", k_cache, "k_cache");
  check_same_device(op, q, "q", v_cache, "v_cache");
  check_same_device(op, q, "q", block_tables, "block_tables");
  check_same_device(op, q, "q", seq_lens, "seq_lens");
  check_same_device(op, q, "q", query_start_loc, "query_start_loc");
}

void check_positions_in_range(const at::Tensor& positions, int64_t max_position) {
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < positions.numel(); ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_position, "rotary_embedding: positions[", t, "] = ", pos[t],
                " is outside the cos_sin_cache's [0, ", max_position, ")");
  }
}

void check_slots_in_range(const at::Tensor& slot_mapping, int64_t num_slots) {
  const int64_t* slots = slot_mapping.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < slot_mapping.numel(); ++t) {
    TORCH_CHECK(slots[t] < num_slots, "reshape_and_cache: slot_mapping[", t, "] = ", slots[t],
                " is past the cache's ", num_slots, " slots (negative slots are skipped)");
  }
}

void check_attention_metadata(const at::Tensor& block_tables, const at::Tensor& seq_lens,
                              const at::Tensor& query_start_loc, int64_t num_tokens, int64_t num_blocks,
                              int64_t block_size, int64_t sliding_window) {
  const char* op = "paged_attention";
  const int32_t* tables = block_tables.const_data_ptr<int32_t>();
  const int32_t* lens = seq_lens.const_data_ptr<int32_t>();
  const int32_t* starts = query_start_loc.const_data_ptr<int32_t>();
  const int64_t num_seqs = seq_lens.numel(), max_blocks = block_tables.size(1);
  TORCH_CHECK(starts[0] >= 0, op, ": query_start_loc[0] = ", starts[0], " is negative");
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t q_len = static_cast<int64_t>(starts[b + 1]) - starts[b];
    TORCH_CHECK(q_len >= 0 && starts[b + 1] <= num_tokens, op, ": query_start_loc must be non-decreasing within [0, ",
                num_tokens, "], got ", starts[b], " then ", starts[b + 1], " for sequence ", b);
    TORCH_CHECK(lens[b] >= q_len, op, ": sequence ", b, " has ", q_len, " queries but seq_lens[", b, "] = ", lens[b],
                "; the cache must already hold every query's token");
    TORCH_CHECK(lens[b] <= max_blocks * block_size, op, ": seq_lens[", b, "] = ", lens[b], " needs more than the ",
                max_blocks, " blocks of ", block_size, " tokens its block_tables row has");
    if (q_len == 0) continue;
    // Only the blocks the queries read must be valid (a sliding window may have freed older ones).
    const int64_t first_key = first_visible_key(query_position(lens[b], q_len, 0), sliding_window);
    for (int64_t blk = first_key / block_size; blk * block_size < lens[b]; ++blk) {
      const int32_t entry = tables[b * max_blocks + blk];
      TORCH_CHECK(entry >= 0 && entry < num_blocks, op, ": block_tables[", b, ", ", blk, "] = ", entry,
                  " is outside the cache's ", num_blocks, " blocks");
    }
  }
}

}  // namespace mistral_grpc

// Quantized linear ops on packs the host does not read (appended: see ops.h).
namespace mistral_grpc {

void check_quantized_linear_args(const char* op, const at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                                 int64_t units, int64_t prompt_rows) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && x.stride(1) == 1, op,
              ": x must be [T, K] (K > 0) with unit stride along K, got shape ", x.sizes(), " strides ", x.strides());
  TORCH_CHECK(is_float_dtype(x), op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  const int64_t rows = x.size(0);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == rows && out.size(1) > 0 && out.stride(1) == 1 &&
                  out.scalar_type() == x.scalar_type(),
              op, ": out must be [", rows, ", N] ", x.scalar_type(), " with unit stride along N, got shape ",
              out.sizes(), " ", out.scalar_type(), " strides ", out.strides());
  check_same_device(op, x, "x", out, "out");
  check_same_device(op, x, "x", packed, "packed_weight");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 1 && packed.is_contiguous() &&
                  reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 == 0,
              op, ": expected a quantized packed weight (a 1-D uint8 tensor from quantize_*_weight or "
              "pack_quantized_*_weight, moved as a whole), got a ", packed.scalar_type(), " tensor of shape ",
              packed.sizes());
  const int64_t n = out.size(1), k = x.size(1);
  TORCH_CHECK(quant::is_quantized_pack_size(packed.numel(), n, k, units), op, ": the packed weight (",
              packed.numel(), " bytes) is not an int8 or int4 ", units == 2 ? "gate_up " : "", "pack of [", n,
              ", ", k, "] (out's N, x's K)");
  TORCH_CHECK(prompt_rows >= -1 && prompt_rows <= rows, op, ": prompt_rows must be -1 or in [0, ", rows, "], got ",
              prompt_rows);
}

}  // namespace mistral_grpc
