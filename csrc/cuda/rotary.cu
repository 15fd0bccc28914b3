// rotary_embedding on CUDA: one block per token; its threads take (head, pack of pairs) items over
// q's and k's heads, rotating in fp32 in place. Math shared with the CPU in common/rotary.h.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <numeric>

#include "common/dispatch.h"
#include "common/rotary.h"
#include "cuda/device.cuh"
#include "ops.h"

namespace mistral_grpc {
namespace {

using cuda::Pack;

constexpr int kThreads = 128;

struct RotaryShape {
  int64_t q_token_stride, k_token_stride, max_position;
  int num_q_heads, num_kv_heads, head_dim;
};

// A position outside the cache cannot be rotated: that token's q and k become NaN, never a wild read.
template <typename T, typename C, int N>
__global__ void rotary_kernel(const int64_t* __restrict__ positions, T* __restrict__ q, T* __restrict__ k,
                              const C* __restrict__ cos_sin_cache, RotaryShape shape) {
  const int64_t token = blockIdx.x;
  const int64_t pos = positions[token];
  const bool valid = pos >= 0 && pos < shape.max_position;
  const int half = shape.head_dim / 2, packs_per_head = half / N;
  const C* cos = cos_sin_cache + (valid ? pos : 0) * shape.head_dim;
  const C* sin = cos + half;
  const int items = (shape.num_q_heads + shape.num_kv_heads) * packs_per_head;
  for (int item = threadIdx.x; item < items; item += blockDim.x) {
    const int head = item / packs_per_head, i = item % packs_per_head * N;
    T* row = head < shape.num_q_heads
                 ? q + token * shape.q_token_stride + head * shape.head_dim
                 : k + token * shape.k_token_stride + (head - shape.num_q_heads) * shape.head_dim;
    Pack<T, N> first = *reinterpret_cast<const Pack<T, N>*>(row + i);
    Pack<T, N> second = *reinterpret_cast<const Pack<T, N>*>(row + half + i);
#pragma unroll
    for (int e = 0; e < N; ++e) {
      float x1 = static_cast<float>(first.v[e]), x2 = static_cast<float>(second.v[e]);
      rotate_pair(x1, x2, static_cast<float>(cos[i + e]), static_cast<float>(sin[i + e]));
      first.v[e] = static_cast<T>(valid ? x1 : NAN);
      second.v[e] = static_cast<T>(valid ? x2 : NAN);
    }
    *reinterpret_cast<Pack<T, N>*>(row + i) = first;
    *reinterpret_cast<Pack<T, N>*>(row + half + i) = second;
  }
}

template <typename T, typename C>
void launch_rotary(const at::Tensor& positions, at::Tensor& q, at::Tensor& k, const at::Tensor& cos_sin_cache,
                   cudaStream_t stream) {
  const RotaryShape shape{.q_token_stride = q.stride(0),
                          .k_token_stride = k.stride(0),
                          .max_position = cos_sin_cache.size(0),
                          .num_q_heads = static_cast<int>(q.size(1)),
                          .num_kv_heads = static_cast<int>(k.size(1)),
                          .head_dim = static_cast<int>(q.size(2))};
  // Packs start at token, head and half-row offsets: all must be whole packs.
  const int64_t granularity = std::gcd(std::gcd(q.size(2) / 2, q.stride(0)), k.stride(0));
  cuda::with_pack_width<T>({q.data_ptr(), k.data_ptr()}, granularity, [&](auto pack) {
    rotary_kernel<T, C, decltype(pack)::value><<<q.size(0), kThreads, 0, stream>>>(
        positions.const_data_ptr<int64_t>(), q.mutable_data_ptr<T>(), k.mutable_data_ptr<T>(),
        cos_sin_cache.const_data_ptr<C>(), shape);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void rotary_embedding_cuda(const at::Tensor& positions, at::Tensor& q, at::Tensor& k, const at::Tensor& cos_sin_cache) {
  check_rotary_embedding_args(positions, q, k, cos_sin_cache);
  const c10::cuda::CUDAGuard guard(q.device());
  if (q.size(0) == 0 || q.size(2) == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MG_DISPATCH_FLOAT_TYPES(q.scalar_type(), "rotary_embedding_cuda", [&] {
    if (cos_sin_cache.scalar_type() == at::kFloat) {
      launch_rotary<scalar_t, float>(positions, q, k, cos_sin_cache, stream);
    } else {
      launch_rotary<scalar_t, scalar_t>(positions, q, k, cos_sin_cache, stream);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mistral_grpc, CUDA, m) { m.impl("rotary_embedding", &rotary_embedding_cuda); }

}  // namespace mistral_grpc
