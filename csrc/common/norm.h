// RMSNorm math shared by the CPU and CUDA kernels, in Hugging Face's order: the input is
// upcast to fp32, normalised, cast back to the input dtype, then multiplied by the weight.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace mistral_grpc {

template <typename T>
MG_HOST_DEVICE float sum_of_squares(const T* row, int64_t n) {
  float acc = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(row[i]);
    acc += v * v;
  }
  return acc;
}

MG_HOST_DEVICE float rms_inverse(float sum_sq, int64_t n, float eps) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(sum_sq / static_cast<float>(n) + eps);
#else
  return 1.f / std::sqrt(sum_sq / static_cast<float>(n) + eps);
#endif
}

// HF: weight * (x.float() * inv).to(dtype)
template <typename T>
MG_HOST_DEVICE T rms_scale(T x, float inv, T w) {
  const T normed = static_cast<T>(static_cast<float>(x) * inv);
  return static_cast<T>(static_cast<float>(w) * static_cast<float>(normed));
}

}  // namespace mistral_grpc
