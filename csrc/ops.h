// Shared host-side declarations for the mistral_grpc ops: the argument checks that the CPU and
// CUDA implementations of one schema both call, so a bad call fails the same way on either device.
#pragma once

#include <ATen/core/Tensor.h>

namespace mistral_grpc {

// Sampling ops (defined in cpu/sampling.cpp).
void check_apply_penalties_args(const at::Tensor& logits, const at::Tensor& prompt_tokens,
                                const at::Tensor& output_tokens, const at::Tensor& repetition,
                                const at::Tensor& presence, const at::Tensor& frequency);
void check_sample_args(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_p,
                       const at::Tensor& top_k, const at::Tensor& seeds, const at::Tensor& offsets,
                       const at::Tensor& tokens, const at::Tensor& logprobs);

}  // namespace mistral_grpc
