// RMSNorm math shared by the CPU and CUDA kernels, in Hugging Face's order: the input is
// upcast to fp32, normalised, cast back to the input dtype, then multiplied by the weight.
//
// V is a float on CUDA and a vector of floats on CPU; `round` rounds to the storage dtype and back
// (HF's intermediate casts), the final cast happens where the result is stored.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace mistral_grpc {

MG_HOST_DEVICE float rms_inverse(float sum_sq, int64_t n, float eps) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(sum_sq / static_cast<float>(n) + eps);
#else
  return 1.f / std::sqrt(sum_sq / static_cast<float>(n) + eps);
#endif
}

// HF: weight * (x.float() * inv).to(dtype)
template <typename V, typename Round>
MG_HOST_DEVICE V rms_scale(const V& x, float inv, const V& weight, Round round) {
  return weight * round(x * inv);
}

// HF's residual add in the activation dtype: hidden = residual + hidden.
template <typename V, typename Round>
MG_HOST_DEVICE V residual_add(const V& x, const V& residual, Round round) {
  return round(x + residual);
}

}  // namespace mistral_grpc
