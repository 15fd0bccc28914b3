// silu_and_mul on CUDA: blocks over (row, column range), 16-byte packs where the rows allow them.
// Math shared with the CPU in common/activation.h.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/activation.h"
#include "common/dispatch.h"
#include "cuda/device.cuh"
#include "ops.h"

namespace mistral_grpc {
namespace {

using cuda::Pack;

constexpr int kThreads = 256;

// blockIdx.x is the row, blockIdx.y a range of kThreads packs within it.
template <typename T, int N>
__global__ void silu_and_mul_kernel(T* __restrict__ out, const T* __restrict__ gate_up, int64_t width) {
  const int64_t pack = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (pack >= width / N) return;
  const T* gate = gate_up + blockIdx.x * 2 * width;
  const Pack<T, N> g = reinterpret_cast<const Pack<T, N>*>(gate)[pack];
  const Pack<T, N> u = reinterpret_cast<const Pack<T, N>*>(gate + width)[pack];
  Pack<T, N> y;
#pragma unroll
  for (int e = 0; e < N; ++e) {
    y.v[e] = static_cast<T>(silu_and_mul(static_cast<float>(g.v[e]), static_cast<float>(u.v[e]), cuda::Exp{},
                                         cuda::RoundTo<T>{}));
  }
  reinterpret_cast<Pack<T, N>*>(out + blockIdx.x * width)[pack] = y;
}

void silu_and_mul_cuda(at::Tensor& out, const at::Tensor& gate_up) {
  check_silu_and_mul_args(out, gate_up);
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t width = out.size(-1);
  if (width == 0 || out.numel() == 0) return;
  const int64_t rows = out.numel() / width;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MG_DISPATCH_FLOAT_TYPES(out.scalar_type(), "silu_and_mul_cuda", [&] {
    // Every row of out and both halves of every gate_up row start at a multiple of `width`.
    cuda::with_pack_width<scalar_t>({out.data_ptr(), gate_up.data_ptr()}, width, [&](auto pack) {
      constexpr int N = decltype(pack)::value;
      const int64_t column_blocks = (width / N + kThreads - 1) / kThreads;
      TORCH_CHECK(column_blocks <= 65535, "silu_and_mul: rows of ", width, " outputs are too wide for the CUDA kernel");
      const dim3 grid(rows, column_blocks);
      silu_and_mul_kernel<scalar_t, N><<<grid, kThreads, 0, stream>>>(out.mutable_data_ptr<scalar_t>(),
                                                                      gate_up.const_data_ptr<scalar_t>(), width);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mistral_grpc, CUDA, m) { m.impl("silu_and_mul", &silu_and_mul_cuda); }

}  // namespace mistral_grpc
