// The token bitmask layout shared by the CPU and CUDA kernels of apply_token_bitmask. It is
// xgrammar's: row b holds ceil(V / 32) int32 words, and bit j of word w stands for token
// 32 * w + j; a set bit allows the token, a clear bit masks its logit to -inf.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace mistral_grpc {

constexpr int64_t kTokensPerMaskWord = 32;

MG_HOST_DEVICE int64_t token_mask_words(int64_t vocab) {
  return (vocab + kTokensPerMaskWord - 1) / kTokensPerMaskWord;
}

MG_HOST_DEVICE bool token_allowed(int32_t word, int64_t token) {
  return (static_cast<uint32_t>(word) >> (token % kTokensPerMaskWord)) & 1u;
}

}  // namespace mistral_grpc
