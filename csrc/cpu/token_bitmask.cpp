// apply_token_bitmask on CPU: rows split across threads; a word with every bit set (the usual case
// inside a JSON string, and every row without a grammar) costs one test.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <limits>

#include "common/dispatch.h"
#include "common/token_bitmask.h"
#include "ops.h"

namespace mistral_grpc {

namespace {

// A row is one to ten microseconds of work; waking a thread team costs more than a batch of a few
// hundred rows takes on one thread (and far more when the cores are busy).
constexpr int64_t kRowGrain = 256;

// Visits only the clear bits of each word: a grammar usually forbids a few tokens per word (inside a
// JSON string) or allows a few (between values), and either way most words need little work.
template <typename scalar_t>
void mask_row(scalar_t* logits, const int32_t* words, int64_t vocab) {
  const auto masked = static_cast<scalar_t>(-std::numeric_limits<float>::infinity());
  for (int64_t w = 0; w < token_mask_words(vocab); ++w) {
    const int64_t first = w * kTokensPerMaskWord;
    if (words[w] == 0) {  // nothing allowed: one vectorised fill
      std::fill_n(logits + first, std::min(kTokensPerMaskWord, vocab - first), masked);
      continue;
    }
    for (uint32_t forbidden = ~static_cast<uint32_t>(words[w]); forbidden != 0; forbidden &= forbidden - 1) {
      const int64_t token = first + std::countr_zero(forbidden);
      if (token >= vocab) break;  // bits past the vocabulary in the last word
      logits[token] = masked;
    }
  }
}

void apply_token_bitmask_cpu(at::Tensor& logits, const at::Tensor& bitmask) {
  check_apply_token_bitmask_args(logits, bitmask);
  const int64_t rows = logits.size(0), vocab = logits.size(1), words = bitmask.size(1);
  const int32_t* bits = bitmask.const_data_ptr<int32_t>();
  MG_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "apply_token_bitmask_cpu", [&] {
    scalar_t* data = logits.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) mask_row(data + r * vocab, bits + r * words, vocab);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mistral_grpc, CPU, m) {
  m.impl("apply_token_bitmask", &apply_token_bitmask_cpu);
}

}  // namespace mistral_grpc
