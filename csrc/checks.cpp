// The ops' argument checks, shared by the CPU and CUDA implementations of an op where both exist:
// every bad call ends in a TORCH_CHECK that names the op and the argument, never in a crash or a
// wrong answer.
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "common/attention.h"
#include "common/quant.h"
#include "common/quant_gemv.h"
#include "common/token_bitmask.h"
#include "cpu/linear_quant.h"
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

// The sampling ops' logits: check_logits, and a vocabulary to sample from.
void check_sampled_logits(const char* op, const at::Tensor& logits) {
  check_logits(op, logits);
  TORCH_CHECK(logits.size(1) > 0, op, ": logits need a non-empty vocabulary dimension");
}

// A per-row argument of the sampling ops: `dims`-D with one row per logits row.
void check_like_rows(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dims,
                     const at::Tensor& logits, const char* op) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, " (got ", t.scalar_type(), ")");
  TORCH_CHECK(t.dim() == dims && t.size(0) == logits.size(0), op, ": ", name, " must be ", dims,
              "-D with one row per logits row (", logits.size(0), "), got shape ", t.sizes());
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on logits' device (", logits.device(),
              "), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// A float weight to pack or quantize: a non-empty float32 or bfloat16 [N, K] CPU matrix. The notes
// end the device and dtype messages (each op says why in its own words).
void check_weight_matrix(const char* op, const char* name, const at::Tensor& w, const char* device_note,
                         const char* dtype_note) {
  TORCH_CHECK(w.device().is_cpu(), op, ": ", name, " must be on the CPU", device_note);
  TORCH_CHECK(w.dim() == 2 && w.size(0) > 0 && w.size(1) > 0, op, ": ", name,
              " must be a non-empty [N, K] matrix, got shape ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16", dtype_note, ", got ", w.scalar_type());
}

constexpr const char* kPackDeviceNote = " (CUDA uses the weight as is)";
constexpr const char* kQuantizeDtypeNote = " (the dtype x and out will have)";

void check_gate_up_match(const char* op, const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type(), op,
              ": gate and up must have one shape and dtype, got ", gate.sizes(), " ", gate.scalar_type(), " and ",
              up.sizes(), " ", up.scalar_type());
}

// The bits of a quantization scheme: "int8" or "int4".
int scheme_bits(const char* op, c10::string_view scheme) {
  if (scheme == "int8") return 8;
  if (scheme == "int4") return 4;
  TORCH_CHECK(false, op, ": scheme must be \"int8\" or \"int4\", got \"", std::string(scheme), "\"");
}

// int8 is per output channel (group_size 0); int4 takes 32, 64 or 128, or 0 for the default.
void check_group_size(const char* op, int bits, int64_t group_size) {
  if (bits == 8) {
    TORCH_CHECK(group_size == 0, op, ": int8 is per output channel; group_size must be 0, got ", group_size);
    return;
  }
  if (group_size == 0) return;
  TORCH_CHECK(quant::is_int4_group_size(group_size), op,
              ": int4 group_size must be 32, 64 or 128 (0: ", quant::kDefaultInt4Group, "), got ", group_size);
}

void check_quantize_args(const char* op, c10::string_view scheme, int64_t group_size) {
  check_group_size(op, scheme_bits(op, scheme), group_size);
}

// The largest magnitude an fp16 scale holds.
constexpr float kMaxScale = 65504.f;

// One unit's values quantized elsewhere: q uint8 [N, K] and, per row and group of K, a scale and a
// zero point, the scales within fp16's range and, for int4, every value in [0, 15].
void check_quantized_unit(const char* op, const char* name, const at::Tensor& q, const at::Tensor& scale,
                          const at::Tensor& zero, int bits, int64_t groups) {
  TORCH_CHECK(q.device().is_cpu() && scale.device().is_cpu() && zero.device().is_cpu(), op, ": ", name,
              " q, scale and zero must be on the CPU");
  TORCH_CHECK(q.scalar_type() == at::kByte && q.dim() == 2 && q.size(0) > 0 && q.size(1) > 0, op, ": ", name,
              " q must be a non-empty uint8 [N, K] matrix, got ", q.scalar_type(), " ", q.sizes());
  const std::vector<int64_t> params_shape{q.size(0), groups};
  TORCH_CHECK(zero.scalar_type() == at::kByte && zero.sizes() == at::IntArrayRef(params_shape), op, ": ", name,
              " zero must be uint8 [N, groups] = ", at::IntArrayRef(params_shape), ", got ", zero.scalar_type(), " ",
              zero.sizes());
  const at::ScalarType scale_type = scale.scalar_type();
  TORCH_CHECK((scale_type == at::kFloat || scale_type == at::kBFloat16 || scale_type == at::kHalf) &&
                  scale.sizes() == at::IntArrayRef(params_shape),
              op, ": ", name, " scale must be float32, bfloat16 or float16 [N, groups] = ",
              at::IntArrayRef(params_shape),
              ", got ", scale_type, " ", scale.sizes());
  const at::Tensor scales = scale.to(at::kFloat).contiguous();
  const float* s = scales.data_ptr<float>();
  TORCH_CHECK(std::all_of(s, s + scales.numel(), [](float v) { return std::isfinite(v) && std::fabs(v) <= kMaxScale; }),
              op, ": ", name, " scale must be finite and within fp16's range (|scale| <= 65504)");
  if (bits == 4) {
    const at::Tensor qs = q.contiguous(), zs = zero.contiguous();
    const auto at_most_15 = [](const at::Tensor& t) {
      const uint8_t* v = t.data_ptr<uint8_t>();
      return std::all_of(v, v + t.numel(), [](uint8_t x) { return x <= 15; });
    };
    TORCH_CHECK(at_most_15(qs) && at_most_15(zs), op, ": ", name, " int4 q and zero must be in [0, 15]");
  }
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

// ---- sampling and structured output ---------------------------------------------------------

void check_logits(const char* op, const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [B, V] (got shape ", logits.sizes(), ")");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": logits must be float32, bfloat16 or float16 (got ", dtype, ")");
  TORCH_CHECK(logits.is_contiguous(), op, ": logits must be contiguous");
}

void check_apply_penalties_args(const at::Tensor& logits, const at::Tensor& prompt_tokens,
                                const at::Tensor& output_tokens, const at::Tensor& repetition,
                                const at::Tensor& presence, const at::Tensor& frequency) {
  constexpr const char* op = "apply_penalties";
  check_sampled_logits(op, logits);
  check_like_rows(prompt_tokens, "prompt_tokens", at::kLong, 2, logits, op);
  check_like_rows(output_tokens, "output_tokens", at::kLong, 2, logits, op);
  check_like_rows(repetition, "repetition", at::kFloat, 1, logits, op);
  check_like_rows(presence, "presence", at::kFloat, 1, logits, op);
  check_like_rows(frequency, "frequency", at::kFloat, 1, logits, op);
}

void check_sample_args(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_p,
                       const at::Tensor& top_k, const at::Tensor& seeds, const at::Tensor& offsets,
                       const at::Tensor& tokens, const at::Tensor& logprobs) {
  constexpr const char* op = "sample";
  check_sampled_logits(op, logits);
  check_like_rows(temperature, "temperature", at::kFloat, 1, logits, op);
  check_like_rows(top_p, "top_p", at::kFloat, 1, logits, op);
  check_like_rows(top_k, "top_k", at::kLong, 1, logits, op);
  check_like_rows(seeds, "seeds", at::kLong, 1, logits, op);
  check_like_rows(offsets, "offsets", at::kLong, 1, logits, op);
  check_like_rows(tokens, "tokens", at::kLong, 1, logits, op);
  check_like_rows(logprobs, "logprobs", at::kFloat, 1, logits, op);
}

void check_apply_token_bitmask_args(const at::Tensor& logits, const at::Tensor& bitmask) {
  constexpr const char* op = "apply_token_bitmask";
  check_logits(op, logits);
  TORCH_CHECK(bitmask.scalar_type() == at::kInt, op, ": bitmask must be int32 (got ", bitmask.scalar_type(), ")");
  const int64_t words = token_mask_words(logits.size(1));
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.size(0) == logits.size(0) && bitmask.size(1) == words, op,
              ": bitmask must be [B, ceil(V / 32)] = [", logits.size(0), ", ", words, "] for logits of shape ",
              logits.sizes(), " (got shape ", bitmask.sizes(), ")");
  TORCH_CHECK(bitmask.is_contiguous(), op, ": bitmask must be contiguous");
  TORCH_CHECK(bitmask.device() == logits.device(), op, ": bitmask must be on logits' device (", logits.device(),
              "), got ", bitmask.device());
}

// ---- linear layers (CPU) ---------------------------------------------------------------------

at::ScalarType torch_dtype(linear::WeightDtype dtype) {
  return dtype == linear::WeightDtype::kFloat32 ? at::kFloat : at::kBFloat16;
}

void check_pack_linear_weight_args(const at::Tensor& weight) {
  check_weight_matrix("pack_linear_weight", "weight", weight, kPackDeviceNote, "");
}

void check_pack_gate_up_weight_args(const at::Tensor& gate, const at::Tensor& up) {
  constexpr const char* op = "pack_gate_up_weight";
  check_weight_matrix(op, "gate", gate, kPackDeviceNote, "");
  check_weight_matrix(op, "up", up, kPackDeviceNote, "");
  check_gate_up_match(op, gate, up);
}

void check_quantize_linear_weight_args(const at::Tensor& weight, c10::string_view scheme, int64_t group_size) {
  constexpr const char* op = "quantize_linear_weight";
  check_weight_matrix(op, "weight", weight, "", kQuantizeDtypeNote);
  check_quantize_args(op, scheme, group_size);
}

void check_quantize_gate_up_weight_args(const at::Tensor& gate, const at::Tensor& up, c10::string_view scheme,
                                        int64_t group_size) {
  constexpr const char* op = "quantize_gate_up_weight";
  check_weight_matrix(op, "gate", gate, "", kQuantizeDtypeNote);
  check_weight_matrix(op, "up", up, "", kQuantizeDtypeNote);
  check_gate_up_match(op, gate, up);
  check_quantize_args(op, scheme, group_size);
}

void check_pack_quantized_args(const char* op, const std::vector<QuantizedUnit>& units, int64_t bits,
                               int64_t group_size, at::ScalarType activation) {
  TORCH_CHECK(bits == 8 || bits == 4, op, ": bits must be 8 or 4, got ", bits);
  const int quant_bits = static_cast<int>(bits);
  const at::Tensor& first = units.front().q;
  TORCH_CHECK(first.dim() == 2, op, ": ", units.front().name, " q must be a uint8 [N, K] matrix, got shape ",
              first.sizes());
  TORCH_CHECK(activation == at::kFloat || activation == at::kBFloat16, op,
              ": activation must be float32 or bfloat16 (the dtype x and out will have), got ", activation);
  check_group_size(op, quant_bits, group_size);
  const int64_t groups =
      quant::geometry(quant_bits, first.size(1), quant::group_size_for(quant_bits, group_size), 1).groups();
  for (const QuantizedUnit& unit : units) {
    check_quantized_unit(op, unit.name, unit.q, unit.scale, unit.zero, quant_bits, groups);
    TORCH_CHECK(unit.q.sizes() == first.sizes(), op, ": ", unit.name, " q must have the shape of ",
                units.front().name, " q ", first.sizes(), ", got ", unit.q.sizes());
  }
}

linear::PackedHeader check_packed_weight(const char* op, const at::Tensor& packed) {
  using namespace linear;
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.dim() == 1 &&
                  packed.is_contiguous() && packed.numel() >= kHeaderBytes,
              op, ": expected a packed weight (a 1-D uint8 CPU tensor from pack_linear_weight or "
              "pack_gate_up_weight), got a ", packed.scalar_type(), " tensor of shape ", packed.sizes(), " on ",
              packed.device());
  PackedHeader header;
  std::memcpy(&header, packed.data_ptr<uint8_t>(), sizeof header);
  const bool dense = header.dtype == WeightDtype::kFloat32 || header.dtype == WeightDtype::kBFloat16;
  const bool known = header.magic == kPackedMagic && (dense || is_quantized(header.dtype)) &&
                     (header.kind == PackKind::kLinear || header.kind == PackKind::kGateUp) && header.n > 0 &&
                     header.k > 0 && (dense ? header.activation == header.dtype : quant_header_valid(header));
  const int64_t bytes = !known ? -1
                        : dense ? packed_bytes(header.dtype, header.kind, header.n, header.k)
                                : quant::packed_bytes(header);
  TORCH_CHECK(known && packed.numel() == bytes, op,
              ": the packed weight is corrupt or was not made by pack_linear_weight / pack_gate_up_weight / "
              "quantize_linear_weight / quantize_gate_up_weight");
  return header;
}

void check_prompt_rows(const char* op, int64_t prompt_rows, int64_t rows) {
  TORCH_CHECK(prompt_rows >= -1 && prompt_rows <= rows, op, ": prompt_rows must be -1 or in [0, ", rows, "], got ",
              prompt_rows);
}

void check_linear_args(const char* op, const at::Tensor& out, const at::Tensor& x, const linear::PackedHeader& header,
                       linear::PackKind kind, int64_t prompt_rows) {
  using linear::PackKind;
  TORCH_CHECK(header.kind == kind, op, ": got a ",
              header.kind == PackKind::kGateUp ? "gate_up weight (from pack_gate_up_weight); use linear_silu_mul"
                                               : "plain weight (from pack_linear_weight); use linear");
  const at::ScalarType dtype = torch_dtype(header.activation);
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu(), op, ": x and out must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == header.k && x.stride(1) == 1, op, ": x must be [T, ", header.k,
              "] with unit stride along K, got shape ", x.sizes(), " strides ", x.strides());
  TORCH_CHECK(x.scalar_type() == dtype, op, ": x must be ", dtype, " like the weight, got ", x.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == header.n && out.stride(1) == 1 &&
                  out.scalar_type() == dtype,
              op, ": out must be [", x.size(0), ", ", header.n, "] ", dtype,
              " with unit stride along N, got shape ", out.sizes(), " ", out.scalar_type(), " strides ",
              out.strides());
  check_prompt_rows(op, prompt_rows, x.size(0));
}

void check_read_bandwidth_args(const at::Tensor& buffer, int64_t repeats) {
  TORCH_CHECK(buffer.device().is_cpu() && buffer.is_contiguous(),
              "read_bandwidth: buffer must be a contiguous CPU tensor");
  TORCH_CHECK(repeats >= 1, "read_bandwidth: repeats must be >= 1, got ", repeats);
  TORCH_CHECK(buffer.nbytes() >= linear::kStepBytes, "read_bandwidth: buffer must hold at least ", linear::kStepBytes,
              " bytes");
}

// ---- decoder_layer (CPU) ---------------------------------------------------------------------

namespace {

// A packed weight of the kind the layer needs at `name`, [n, k] (n < 0: any), in the layer's dtype.
// Returns its n.
int64_t check_layer_weight(const at::Tensor& packed, const char* name, bool gate_up, int64_t n, int64_t k,
                           at::ScalarType dtype) {
  const linear::PackedHeader header = check_packed_weight("decoder_layer", packed);
  TORCH_CHECK((header.kind == linear::PackKind::kGateUp) == gate_up, "decoder_layer: ", name, " must come from ",
              gate_up ? "pack_gate_up_weight" : "pack_linear_weight");
  const at::ScalarType weight_dtype = torch_dtype(header.activation);
  TORCH_CHECK((n < 0 || header.n == n) && header.k == k && weight_dtype == dtype, "decoder_layer: ", name,
              " must be [", n < 0 ? "N" : std::to_string(n), ", ", k, "] ", dtype, ", got [", header.n, ", ",
              header.k, "] ", weight_dtype);
  return header.n;
}

}  // namespace

DecoderLayerShape check_decoder_layer_args(const at::Tensor& hidden, const at::Tensor& key_cache,
                                           const at::Tensor& qkv_weight, const at::Tensor& o_weight,
                                           const at::Tensor& gate_up_weight, const at::Tensor& down_weight) {
  TORCH_CHECK(hidden.dim() == 2, "decoder_layer: hidden must be [T, hidden_size], got ", hidden.sizes());
  TORCH_CHECK(key_cache.dim() == 4, "decoder_layer: key_cache must be [num_blocks, block_size, Hkv, D], got ",
              key_cache.sizes());
  const int64_t hidden_size = hidden.size(1);
  const int64_t num_kv_heads = key_cache.size(2), head_dim = key_cache.size(3);
  const int64_t kv_size = num_kv_heads * head_dim;
  // The packed qkv weight's N is (Hq + 2 Hkv) * D: it gives the query heads.
  const int64_t qkv_size = check_layer_weight(qkv_weight, "qkv_weight", false, -1, hidden_size, hidden.scalar_type());
  const int64_t q_size = qkv_size - 2 * kv_size;
  TORCH_CHECK(head_dim > 0 && q_size > 0 && q_size % (head_dim * num_kv_heads) == 0, "decoder_layer: the qkv weight's ",
              qkv_size, " outputs are not (Hq + 2 * ", num_kv_heads, ") * ", head_dim, " for the cache's Hkv and D");
  check_layer_weight(o_weight, "o_weight", false, hidden_size, q_size, hidden.scalar_type());
  const int64_t ffn = check_layer_weight(gate_up_weight, "gate_up_weight", true, -1, hidden_size, hidden.scalar_type());
  check_layer_weight(down_weight, "down_weight", false, hidden_size, ffn, hidden.scalar_type());
  return {.tokens = hidden.size(0),
          .hidden_size = hidden_size,
          .num_kv_heads = num_kv_heads,
          .head_dim = head_dim,
          .kv_size = kv_size,
          .q_size = q_size,
          .qkv_size = qkv_size,
          .ffn = ffn};
}

// A quantized pack on CUDA, which the host does not read: its size must fit the shapes (the kernels
// check its header).
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
  check_prompt_rows(op, prompt_rows, rows);
}

}  // namespace mistral_grpc
