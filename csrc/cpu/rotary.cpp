// rotary_embedding on CPU: tokens split across threads; each head's (i, i + D/2) pairs rotate in
// fp32 vectors, in place.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common/dispatch.h"
#include "common/rotary.h"
#include "cpu/ops_cpu.h"
#include "cpu/simd.h"
#include "ops.h"

namespace mistral_grpc {
namespace {

constexpr int64_t kTokenGrain = 4;

struct HeadsView {
  int64_t token_stride, num_heads;
};

template <typename T, typename C>
MG_ALWAYS_INLINE void rotate_heads(T* token, HeadsView view, const C* cos, const C* sin, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < view.num_heads; ++h) {
    T* first = token + h * head_dim;
    T* second = first + half;
    cpu::for_each_lane_step(half, [&](int64_t i, int64_t n) {
      cpu::vfloat x1 = cpu::load_n(first + i, n), x2 = cpu::load_n(second + i, n);
      rotate_pair(x1, x2, cpu::load_n(cos + i, n), cpu::load_n(sin + i, n));
      cpu::store_n(first + i, x1, n);
      cpu::store_n(second + i, x2, n);
    });
  }
}

template <typename T, typename C>
MG_CPU_CLONES void rotate_tokens(const int64_t* positions, T* q, HeadsView q_view, T* k, HeadsView k_view,
                                 const C* cos_sin_cache, int64_t head_dim, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    const C* cos = cos_sin_cache + positions[t] * head_dim;
    const C* sin = cos + head_dim / 2;
    rotate_heads(q + t * q_view.token_stride, q_view, cos, sin, head_dim);
    rotate_heads(k + t * k_view.token_stride, k_view, cos, sin, head_dim);
  }
}

template <typename T, typename C>
void rotate(const at::Tensor& positions, at::Tensor& q, at::Tensor& k, const at::Tensor& cos_sin_cache) {
  const HeadsView q_view{.token_stride = q.stride(0), .num_heads = q.size(1)};
  const HeadsView k_view{.token_stride = k.stride(0), .num_heads = k.size(1)};
  at::parallel_for(0, q.size(0), kTokenGrain, [&](int64_t begin, int64_t end) {
    rotate_tokens(positions.const_data_ptr<int64_t>(), q.mutable_data_ptr<T>(), q_view, k.mutable_data_ptr<T>(),
                  k_view, cos_sin_cache.const_data_ptr<C>(), q.size(2), begin, end);
  });
}

}  // namespace

void rotary_embedding_cpu(const at::Tensor& positions, at::Tensor& q, at::Tensor& k, const at::Tensor& cos_sin_cache) {
  check_rotary_embedding_args(positions, q, k, cos_sin_cache);
  check_positions_in_range(positions, cos_sin_cache.size(0));
  MG_DISPATCH_FLOAT_TYPES(q.scalar_type(), "rotary_embedding_cpu", [&] {
    if (cos_sin_cache.scalar_type() == at::kFloat) {
      rotate<scalar_t, float>(positions, q, k, cos_sin_cache);
    } else {
      rotate<scalar_t, scalar_t>(positions, q, k, cos_sin_cache);
    }
  });
}

TORCH_LIBRARY_IMPL(mistral_grpc, CPU, m) { m.impl("rotary_embedding", &rotary_embedding_cpu); }

}  // namespace mistral_grpc
