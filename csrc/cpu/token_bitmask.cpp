// apply_token_bitmask on CPU: rows split across threads; a word with every bit set (the usual case
// inside a JSON string, and every row without a grammar) is skipped whole. Also the argument checks
// both backends share (declared in ops.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common/dispatch.h"
#include "common/token_bitmask.h"
#include "ops.h"

namespace mistral_grpc {

void check_apply_token_bitmask_args(const at::Tensor& logits, const at::Tensor& bitmask) {
  constexpr const char* op = "apply_token_bitmask";
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [B, V] (got shape ", logits.sizes(), ")");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": logits must be float32, bfloat16 or float16 (got ", dtype, ")");
  TORCH_CHECK(logits.is_contiguous(), op, ": logits must be contiguous");
  TORCH_CHECK(bitmask.scalar_type() == at::kInt, op, ": bitmask must be int32 (got ", bitmask.scalar_type(), ")");
  const int64_t words = token_mask_words(logits.size(1));
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.size(0) == logits.size(0) && bitmask.size(1) == words, op,
              ": bitmask must be [B, ceil(V / 32)] = [", logits.size(0), ", ", words, "] for logits of shape ",
              logits.sizes(), " (got shape ", bitmask.sizes(), ")");
  TORCH_CHECK(bitmask.is_contiguous(), op, ": bitmask must be contiguous");
  TORCH_CHECK(bitmask.device() == logits.device(), op, ": bitmask must be on logits' device (", logits.device(),
              "), got ", bitmask.device());
}

namespace {

constexpr int32_t kAllAllowed = -1;  // every bit set
// A row is a microsecond of work (ceil(V / 32) word tests): threads only pay off for big batches.
constexpr int64_t kRowGrain = 64;

template <typename scalar_t>
void mask_row(scalar_t* logits, const int32_t* words, int64_t vocab) {
  const auto masked = static_cast<scalar_t>(-std::numeric_limits<float>::infinity());
  for (int64_t w = 0; w < token_mask_words(vocab); ++w) {
    if (words[w] == kAllAllowed) continue;
    const int64_t end = std::min(vocab, (w + 1) * kTokensPerMaskWord);
    for (int64_t token = w * kTokensPerMaskWord; token < end; ++token) {
      if (!token_allowed(words[w], token)) logits[token] = masked;
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
