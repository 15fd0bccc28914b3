// RMSNorm kernels on CUDA: one block per row, a block-wide reduction of the sum of squares.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/norm.h"

namespace mistral_grpc {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void rms_norm_kernel(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ w,
                                int64_t hidden, float eps) {
  const T* row = x + blockIdx.x * hidden;
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float v = static_cast<float>(row[i]);
    acc += v * v;
  }
  __shared__ float partial[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffff, acc, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = acc;
  __syncthreads();
  __shared__ float inv;
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int i = 0; i < kThreads / 32; ++i) total += partial[i];
    inv = rms_inverse(total, hidden, eps);
  }
  __syncthreads();
  T* dst = out + blockIdx.x * hidden;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = rms_scale(row[i], inv, w[i]);
}

void rms_norm_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.numel(), "rms_norm: x's last dim (", x.size(-1),
              ") must equal weight's size (", weight.numel(), ")");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && out.is_contiguous() && out.sizes() == x.sizes(),
              "rms_norm: out, x and weight must be contiguous, out of x's shape");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t hidden = x.size(-1);
  const int64_t rows = x.numel() / hidden;
  if (rows == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_cuda", [&] {
    rms_norm_kernel<scalar_t><<<rows, kThreads, 0, stream>>>(out.mutable_data_ptr<scalar_t>(),
                                                             x.const_data_ptr<scalar_t>(),
                                                             weight.const_data_ptr<scalar_t>(), hidden,
                                                             static_cast<float>(eps));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mistral_grpc, CUDA, m) { m.impl("rms_norm", &rms_norm_cuda); }

}  // namespace mistral_grpc
