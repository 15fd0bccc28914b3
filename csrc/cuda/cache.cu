// reshape_and_cache on CUDA: one block per token copies its key and value rows to their slot in
// 16-byte packs where the layout allows. Addressing shared with the CPU in common/cache.h.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <numeric>

#include "common/cache.h"
#include "common/dispatch.h"
#include "cuda/device.cuh"
#include "ops.h"

namespace mistral_grpc {
namespace {

using cuda::Pack;

constexpr int kThreads = 128;

struct CacheShape {
  int64_t k_token_stride, v_token_stride, num_slots;
  int num_kv_heads, head_dim;
};

// Negative slots are padding; slots past the cache are skipped too (the host cannot check device
// slot values without a sync), so a bad slot never writes outside the cache.
template <typename T, int N>
__global__ void reshape_and_cache_kernel(const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ k_cache,
                                         T* __restrict__ v_cache, const int64_t* __restrict__ slot_mapping,
                                         CacheShape shape) {
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0 || slot >= shape.num_slots) return;
  const int64_t row_packs = cache_token_stride(shape.num_kv_heads, shape.head_dim) / N;
  const int64_t dst = cache_offset(slot, 0, shape.num_kv_heads, shape.head_dim);
  const auto* k_src = reinterpret_cast<const Pack<T, N>*>(k + token * shape.k_token_stride);
  const auto* v_src = reinterpret_cast<const Pack<T, N>*>(v + token * shape.v_token_stride);
  auto* k_dst = reinterpret_cast<Pack<T, N>*>(k_cache + dst);
  auto* v_dst = reinterpret_cast<Pack<T, N>*>(v_cache + dst);
  for (int64_t i = threadIdx.x; i < row_packs; i += blockDim.x) {
    k_dst[i] = k_src[i];
    v_dst[i] = v_src[i];
  }
}

void reshape_and_cache_cuda(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                            const at::Tensor& slot_mapping) {
  check_reshape_and_cache_args(k, v, k_cache, v_cache, slot_mapping);
  const c10::cuda::CUDAGuard guard(k_cache.device());
  if (k.size(0) == 0 || k.numel() == 0) return;
  const CacheShape shape{.k_token_stride = k.stride(0),
                         .v_token_stride = v.stride(0),
                         .num_slots = k_cache.size(0) * k_cache.size(1),
                         .num_kv_heads = static_cast<int>(k_cache.size(2)),
                         .head_dim = static_cast<int>(k_cache.size(3))};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Pack boundaries must fall on cache rows and on source token rows alike.
  const int64_t granularity =
      std::gcd(std::gcd(cache_token_stride(shape.num_kv_heads, shape.head_dim), k.stride(0)), v.stride(0));
  MG_DISPATCH_FLOAT_TYPES(k.scalar_type(), "reshape_and_cache_cuda", [&] {
    cuda::with_pack_width<scalar_t>({k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr()},
                                    granularity, [&](auto pack) {
      reshape_and_cache_kernel<scalar_t, decltype(pack)::value><<<k.size(0), kThreads, 0, stream>>>(
          k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), k_cache.mutable_data_ptr<scalar_t>(),
          v_cache.mutable_data_ptr<scalar_t>(), slot_mapping.const_data_ptr<int64_t>(), shape);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mistral_grpc, CUDA, m) { m.impl("reshape_and_cache", &reshape_and_cache_cuda); }

}  // namespace mistral_grpc
