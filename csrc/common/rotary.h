// Rotary embedding math shared by the CPU and CUDA kernels: Hugging Face's rotate_half pairing,
// element i with element i + D/2, in fp32. cos_sin_cache rows hold cos for the D/2 frequencies,
// then sin. V is a float on CUDA and a vector of floats on CPU.
#pragma once

#include "common/host_device.h"

namespace mistral_grpc {

// x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1).
template <typename V>
MG_HOST_DEVICE void rotate_pair(V& x1, V& x2, const V& cos, const V& sin) {
  const V first = x1 * cos - x2 * sin;
  const V second = x2 * cos + x1 * sin;
  x1 = first;
  x2 = second;
}

}  // namespace mistral_grpc
