// reshape_and_cache on CPU: each token's [Hkv, D] key and value rows copied to their cache slot.
// A plain byte copy: no arithmetic, so no dtype dispatch.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>

#include "common/cache.h"
#include "cpu/ops_cpu.h"
#include "ops.h"

namespace mistral_grpc {
namespace {

constexpr int64_t kTokenGrain = 64;

}  // namespace

void reshape_and_cache_cpu(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                           const at::Tensor& slot_mapping) {
  check_reshape_and_cache_args(k, v, k_cache, v_cache, slot_mapping);
  const int64_t num_kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
  check_slots_in_range(slot_mapping, k_cache.size(0) * k_cache.size(1));
  const int64_t item = k.element_size();
  const int64_t row_bytes = cache_token_stride(num_kv_heads, head_dim) * item;
  const int64_t* slots = slot_mapping.const_data_ptr<int64_t>();
  const auto* k_src = static_cast<const char*>(k.const_data_ptr());
  const auto* v_src = static_cast<const char*>(v.const_data_ptr());
  auto* k_dst = static_cast<char*>(k_cache.mutable_data_ptr());
  auto* v_dst = static_cast<char*>(v_cache.mutable_data_ptr());
  at::parallel_for(0, k.size(0), kTokenGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slots[t] < 0) continue;  // padding tokens own no slot
      const int64_t dst = cache_offset(slots[t], 0, num_kv_heads, head_dim) * item;
      std::memcpy(k_dst + dst, k_src + t * k.stride(0) * item, row_bytes);
      std::memcpy(v_dst + dst, v_src + t * v.stride(0) * item, row_bytes);
    }
  });
}

TORCH_LIBRARY_IMPL(mistral_grpc, CPU, m) { m.impl("reshape_and_cache", &reshape_and_cache_cpu); }

}  // namespace mistral_grpc
