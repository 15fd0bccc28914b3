// SiLU-and-multiply math shared by the CPU and CUDA kernels, in Hugging Face's order:
// act_fn(gate) is rounded to the activation dtype before the product with up.
// V is a float on CUDA and a vector of floats on CPU; Exp is that side's exponential.
#pragma once

#include "common/host_device.h"

namespace mistral_grpc {

template <typename V, typename Exp>
MG_HOST_DEVICE V silu(const V& x, Exp exp) {
  return x / (1.f + exp(-x));
}

template <typename V, typename Exp, typename Round>
MG_HOST_DEVICE V silu_and_mul(const V& gate, const V& up, Exp exp, Round round) {
  return round(silu(gate, exp)) * up;
}

}  // namespace mistral_grpc
