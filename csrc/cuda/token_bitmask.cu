// apply_token_bitmask on CUDA: grid x = logits rows, one thread per logit, so writes stay coalesced
// and the 32 threads that share a mask word read it as one broadcast load. Only masked logits are
// written.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "common/dispatch.h"
#include "common/token_bitmask.h"
#include "ops.h"

namespace mistral_grpc {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void apply_token_bitmask_kernel(scalar_t* __restrict__ logits, const int32_t* __restrict__ bitmask,
                                           int64_t vocab, int64_t words) {
  const int64_t token = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (token >= vocab) return;
  const int64_t row = blockIdx.x;
  if (!token_allowed(bitmask[row * words + token / kTokensPerMaskWord], token)) {
    logits[row * vocab + token] = static_cast<scalar_t>(-std::numeric_limits<float>::infinity());
  }
}

void apply_token_bitmask_cuda(at::Tensor& logits, const at::Tensor& bitmask) {
  check_apply_token_bitmask_args(logits, bitmask);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  if (rows == 0 || vocab == 0) return;
  const int64_t chunks = (vocab + kThreads - 1) / kThreads;
  TORCH_CHECK(chunks <= 65535, "apply_token_bitmask: a vocabulary of ", vocab, " is too large for one launch");
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(chunks));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MG_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "apply_token_bitmask_cuda", [&] {
    apply_token_bitmask_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        logits.mutable_data_ptr<scalar_t>(), bitmask.const_data_ptr<int32_t>(), vocab, bitmask.size(1));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(mistral_grpc, CUDA, m) {
  m.impl("apply_token_bitmask", &apply_token_bitmask_cuda);
}

}  // namespace mistral_grpc
