// RMSNorm kernels on CUDA: one block per row, a block-wide reduction of the sum of squares, then the
// scale; 16-byte loads when the rows allow them. Math shared with the CPU in common/norm.h.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/dispatch.h"
#include "common/norm.h"
#include "cuda/device.cuh"
#include "ops.h"

namespace mistral_grpc {
namespace {

using cuda::Pack;

constexpr int kThreads = 256;

// Sum of squares of a row read as packs of N, reduced across the block.
template <typename T, int N>
__device__ float row_sum_of_squares(const T* row, int64_t hidden, float* partial) {
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < hidden / N; i += blockDim.x) {
    const Pack<T, N> pack = reinterpret_cast<const Pack<T, N>*>(row)[i];
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const float v = static_cast<float>(pack.v[e]);
      acc += v * v;
    }
  }
  return cuda::block_sum(acc, partial);
}

template <typename T, int N>
__device__ void scale_row(T* dst, const T* row, const T* weight, int64_t hidden, float inv) {
  for (int64_t i = threadIdx.x; i < hidden / N; i += blockDim.x) {
    const Pack<T, N> x = reinterpret_cast<const Pack<T, N>*>(row)[i];
    const Pack<T, N> w = reinterpret_cast<const Pack<T, N>*>(weight)[i];
    Pack<T, N> y;
#pragma unroll
    for (int e = 0; e < N; ++e) {
      y.v[e] = static_cast<T>(rms_scale(static_cast<float>(x.v[e]), inv, static_cast<float>(w.v[e]),
                                        cuda::RoundTo<T>{}));
    }
    reinterpret_cast<Pack<T, N>*>(dst)[i] = y;
  }
}

template <typename T, int N>
__global__ void rms_norm_kernel(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ weight,
                                int64_t hidden, float eps) {
  __shared__ float partial[kThreads / cuda::kWarpSize];
  const T* row = x + blockIdx.x * hidden;
  const float inv = rms_inverse(row_sum_of_squares<T, N>(row, hidden, partial), hidden, eps);
  scale_row<T, N>(out + blockIdx.x * hidden, row, weight, hidden, inv);
}

// residual += x (rounded to T, as HF adds in the activation dtype); x = rms_norm(residual).
template <typename T, int N>
__global__ void fused_add_rms_norm_kernel(T* __restrict__ x, T* __restrict__ residual, const T* __restrict__ weight,
                                          int64_t hidden, float eps) {
  __shared__ float partial[kThreads / cuda::kWarpSize];
  T* x_row = x + blockIdx.x * hidden;
  T* res_row = residual + blockIdx.x * hidden;
  for (int64_t i = threadIdx.x; i < hidden / N; i += blockDim.x) {
    const Pack<T, N> a = reinterpret_cast<const Pack<T, N>*>(x_row)[i];
    Pack<T, N> r = reinterpret_cast<const Pack<T, N>*>(res_row)[i];
#pragma unroll
    for (int e = 0; e < N; ++e) {
      r.v[e] = static_cast<T>(residual_add(static_cast<float>(a.v[e]), static_cast<float>(r.v[e]), cuda::RoundTo<T>{}));
    }
    reinterpret_cast<Pack<T, N>*>(res_row)[i] = r;
  }
  // Each thread re-reads only the packs it wrote, so no barrier is needed before the reduction.
  const float inv = rms_inverse(row_sum_of_squares<T, N>(res_row, hidden, partial), hidden, eps);
  scale_row<T, N>(x_row, res_row, weight, hidden, inv);
}

void rms_norm_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_args(out, x, weight);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t hidden = x.size(-1);
  if (hidden == 0 || x.numel() == 0) return;
  const int64_t rows = x.numel() / hidden;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MG_DISPATCH_FLOAT_TYPES(x.scalar_type(), "rms_norm_cuda", [&] {
    cuda::with_pack_width<scalar_t>({out.data_ptr(), x.data_ptr(), weight.data_ptr()}, hidden, [&](auto pack) {
      rms_norm_kernel<scalar_t, decltype(pack)::value><<<rows, kThreads, 0, stream>>>(
          out.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), hidden,
          static_cast<float>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void fused_add_rms_norm_cuda(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_fused_add_rms_norm_args(x, residual, weight);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t hidden = x.size(-1);
  if (hidden == 0 || x.numel() == 0) return;
  const int64_t rows = x.numel() / hidden;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MG_DISPATCH_FLOAT_TYPES(x.scalar_type(), "fused_add_rms_norm_cuda", [&] {
    cuda::with_pack_width<scalar_t>({x.data_ptr(), residual.data_ptr(), weight.data_ptr()}, hidden, [&](auto pack) {
      fused_add_rms_norm_kernel<scalar_t, decltype(pack)::value><<<rows, kThreads, 0, stream>>>(
          x.mutable_data_ptr<scalar_t>(), residual.mutable_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
          hidden, static_cast<float>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mistral_grpc, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cuda);
}

}  // namespace mistral_grpc
