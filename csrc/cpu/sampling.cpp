// Penalty and sampling kernels on CPU, one row per task (at::parallel_for). Sampling follows the
// rule of common/sampling.h and finds its thresholds by selection rather than sorting
// (nth_element for top-k, a weighted quickselect for top-p), so a row costs O(V).
// Also the argument checks both backends share (declared in ops.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <functional>
#include <utility>
#include <vector>

#include "common/philox.h"
#include "common/sampling.h"
#include "ops.h"

namespace mistral_grpc {

namespace {

void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [B, V] (got shape ", logits.sizes(), ")");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": logits must be float32, bfloat16 or float16 (got ", dtype, ")");
  TORCH_CHECK(logits.size(1) > 0, op, ": logits need a non-empty vocabulary dimension");
  TORCH_CHECK(logits.is_contiguous(), op, ": logits must be contiguous");
}

void check_like_rows(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dims,
                     const at::Tensor& logits, const char* op) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, " (got ", t.scalar_type(), ")");
  TORCH_CHECK(t.dim() == dims && t.size(0) == logits.size(0), op, ": ", name, " must be ", dims,
              "-D with one row per logits row (", logits.size(0), "), got shape ", t.sizes());
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on logits' device (", logits.device(),
              "), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

}  // namespace

void check_apply_penalties_args(const at::Tensor& logits, const at::Tensor& prompt_tokens,
                                const at::Tensor& output_tokens, const at::Tensor& repetition,
                                const at::Tensor& presence, const at::Tensor& frequency) {
  constexpr const char* op = "apply_penalties";
  check_logits(logits, op);
  check_like_rows(prompt_tokens, "prompt_tokens", at::kLong, 2, logits, op);
  check_like_rows(output_tokens, "output_tokens", at::kLong, 2, logits, op);
  check_like_rows(repetition, "repetition", at::kFloat, 1, logits, op);
  check_like_rows(presence, "presence", at::kFloat, 1, logits, op);
  check_like_rows(frequency, "frequency", at::kFloat, 1, logits, op);
}

void check_sample_args(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_p,
                       const at::Tensor& top_k, const at::Tensor& seeds, const at::Tensor& offsets,
                       const at::Tensor& tokens, const at::Tensor& logprobs) {
  constexpr const char* op = "sample";
  check_logits(logits, op);
  check_like_rows(temperature, "temperature", at::kFloat, 1, logits, op);
  check_like_rows(top_p, "top_p", at::kFloat, 1, logits, op);
  check_like_rows(top_k, "top_k", at::kLong, 1, logits, op);
  check_like_rows(seeds, "seeds", at::kLong, 1, logits, op);
  check_like_rows(offsets, "offsets", at::kLong, 1, logits, op);
  check_like_rows(tokens, "tokens", at::kLong, 1, logits, op);
  check_like_rows(logprobs, "logprobs", at::kFloat, 1, logits, op);
}

namespace {

// --- apply_penalties -------------------------------------------------------------------------

// marks[t] for the row being penalised: kListed once t occurs in the prompt or the output, plus
// its output count in the low bits. Cleared as each token is penalised, so a duplicate is
// penalised once and the vector is all zeros again for the next row, in O(L) rather than O(V).
constexpr int32_t kListed = 1 << 30;

template <typename scalar_t>
void penalize_row(scalar_t* logits, int64_t vocab, const int64_t* prompt, int64_t prompt_len, const int64_t* output,
                  int64_t output_len, float repetition, float presence, float frequency, std::vector<int32_t>& marks) {
  // Ids outside [0, V) are padding (-1) or cannot have a logit to penalise.
  const auto in_vocab = [vocab](int64_t t) { return t >= 0 && t < vocab; };
  for (int64_t i = 0; i < prompt_len; ++i)
    if (in_vocab(prompt[i])) marks[prompt[i]] |= kListed;
  for (int64_t i = 0; i < output_len; ++i)
    if (in_vocab(output[i])) marks[output[i]] = (marks[output[i]] | kListed) + 1;
  const auto penalize = [&](int64_t t) {
    if (!in_vocab(t) || marks[t] == 0) return;
    logits[t] = static_cast<scalar_t>(penalized_logit(static_cast<float>(logits[t]), marks[t] & (kListed - 1),
                                                      /*seen=*/true, repetition, presence, frequency));
    marks[t] = 0;
  };
  for (int64_t i = 0; i < prompt_len; ++i) penalize(prompt[i]);
  for (int64_t i = 0; i < output_len; ++i) penalize(output[i]);
}

void apply_penalties_cpu(at::Tensor& logits, const at::Tensor& prompt_tokens, const at::Tensor& output_tokens,
                         const at::Tensor& repetition, const at::Tensor& presence, const at::Tensor& frequency) {
  check_apply_penalties_args(logits, prompt_tokens, output_tokens, repetition, presence, frequency);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const int64_t prompt_len = prompt_tokens.size(1), output_len = output_tokens.size(1);
  const float* rep = repetition.const_data_ptr<float>();
  const float* pres = presence.const_data_ptr<float>();
  const float* freq = frequency.const_data_ptr<float>();
  const int64_t* prompt = prompt_tokens.const_data_ptr<int64_t>();
  const int64_t* output = output_tokens.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "apply_penalties_cpu", [&] {
    scalar_t* data = logits.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> marks;
      for (int64_t r = begin; r < end; ++r) {
        if (penalties_neutral(rep[r], pres[r], freq[r])) continue;
        marks.resize(vocab, 0);
        penalize_row(data + r * vocab, vocab, prompt + r * prompt_len, prompt_len, output + r * output_len,
                     output_len, rep[r], pres[r], freq[r], marks);
      }
    });
  });
}

// --- sample ----------------------------------------------------------------------------------

struct RowSettings {
  float temperature;
  float top_p;
  int64_t top_k;
  uint64_t seed;
  uint64_t offset;
};

struct Draw {
  int64_t token;
  float logprob;
};

// The largest logit v such that the items with logit >= v weigh at least `target` (items are
// (logit, weight) pairs; reordered in place). Quickselect on the logit: each round splits the
// window around a pivot and keeps the side holding the crossing, O(n) expected.
float weighted_select(std::vector<std::pair<float, float>>& items, float target) {
  const auto weight_of = [](auto first, auto last) {
    float sum = 0.f;
    for (; first != last; ++first) sum += first->second;
    return sum;
  };
  auto lo = items.begin(), hi = items.end();
  float above = 0.f;  // weight of the items known to lie above the window: always < target
  while (lo != hi) {
    const float pivot = lo[(hi - lo) / 2].first;
    const auto greater_end = std::partition(lo, hi, [pivot](const auto& item) { return item.first > pivot; });
    const auto equal_end = std::partition(greater_end, hi, [pivot](const auto& item) { return item.first == pivot; });
    const float greater = weight_of(lo, greater_end), equal = weight_of(greater_end, equal_end);
    if (greater_end != lo && above + greater >= target) {
      hi = greater_end;
    } else if (above + greater + equal >= target) {
      return pivot;
    } else {
      above += greater + equal;
      lo = equal_end;
    }
  }
  return -INFINITY;  // rounding left the target just out of reach: keep every item
}

// exp(x) for x <= 0 (the sampler only exponentiates logit - max), within a few ulp of expf:
// Cody-Waite reduction and Cephes' polynomial in plain arithmetic, so loops calling it vectorise
// (std::exp does not without -ffast-math). Results below FLT_MIN flush to 0, so exp(-inf) is 0.
// The range test compares bit patterns, not floats: for x <= 0 a larger pattern is a larger
// magnitude, and an integer compare lets GCC vectorise under -ftrapping-math.
inline float exp_nonpositive(float x) {
  constexpr uint32_t kLowest = std::bit_cast<uint32_t>(-87.33654f);  // ~log(FLT_MIN)
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const bool in_range = bits <= kLowest;
  const float clamped = std::bit_cast<float>(in_range ? bits : kLowest);
  const float n = (clamped * 1.44269504f + 12582912.f) - 12582912.f;  // round(x / ln 2), by 1.5 * 2^23
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;    // x - n ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float scale = std::bit_cast<float>(in_range ? (static_cast<int32_t>(n) + 127) << 23 : 0);  // 2^n
  return (p * r * r + r + 1.f) * scale;
}

// Samples one row at a time, reusing its scratch across the rows of one parallel task. The
// whole-row passes are written so the compiler vectorises them (omp simd reductions).
class RowSampler {
 public:
  explicit RowSampler(int64_t vocab) : logit_(vocab), weight_(vocab) {}

  template <typename scalar_t>
  Draw sample(const scalar_t* row, const RowSettings& settings) {
    const int64_t vocab = static_cast<int64_t>(logit_.size());
    float* x = logit_.data();
    float max_logit = -INFINITY;
#pragma omp simd reduction(max : max_logit)
    for (int64_t i = 0; i < vocab; ++i) {
      x[i] = sanitize_logit(static_cast<float>(row[i]));
      max_logit = x[i] > max_logit ? x[i] : max_logit;
    }
    const int64_t best = std::find(x, x + vocab, max_logit) - x;  // the first maximum: greedy's tie-break
    if (settings.temperature == 0.f || max_logit == -INFINITY) {
      return {best, max_logit - log_normalizer(max_logit)};
    }
    const float total = fill_weights(max_logit, settings.temperature);
    const float log_norm = settings.temperature == 1.f ? max_logit + std::log(total) : log_normalizer(max_logit);

    float keep_from = -INFINITY;
    if (top_k_active(settings.top_k, vocab)) keep_from = top_k_threshold(settings.top_k);
    if (top_p_active(settings.top_p)) keep_from = std::max(keep_from, top_p_threshold(keep_from, settings.top_p));

    const float* w = weight_.data();
    float kept = 0.f;
#pragma omp simd reduction(+ : kept)
    for (int64_t i = 0; i < vocab; ++i) kept += static_cast<float>(x[i] >= keep_from) * w[i];
    const float target = philox_uniform(settings.seed, settings.offset) * kept;
    float running = 0.f;
    int64_t last = best;
    for (int64_t i = 0; i < vocab; ++i) {
      if (x[i] < keep_from || w[i] == 0.f) continue;
      running += w[i];
      last = i;
      if (passes_target(running, target)) break;
    }
    // Without a crossing (the running sum rounded below the vectorised total) `last` is the CDF's end.
    return {last, x[last] - log_norm};
  }

 private:
  // log(sum(exp(logits))) at temperature 1, for the returned log-probability.
  float log_normalizer(float max_logit) const {
    if (max_logit == -INFINITY) return NAN;  // every logit -inf: no distribution to speak of
    const float* x = logit_.data();
    const int64_t vocab = static_cast<int64_t>(logit_.size());
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < vocab; ++i) sum += exp_nonpositive(x[i] - max_logit);
    return max_logit + std::log(sum);
  }

  float fill_weights(float max_logit, float temperature) {
    const float* x = logit_.data();
    float* w = weight_.data();
    const int64_t vocab = static_cast<int64_t>(logit_.size());
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < vocab; ++i) {
      w[i] = exp_nonpositive(weight_exponent(x[i], max_logit, temperature));
      sum += w[i];
    }
    return sum;
  }

  // The k-th largest logit: a min-heap of the k largest seen so far, so a logit costs one compare
  // with the heap's least unless it enters (about k log(V/k) times in all for unordered logits).
  float top_k_threshold(int64_t top_k) {
    const auto greater = std::greater<float>();
    heap_.assign(logit_.begin(), logit_.begin() + top_k);
    std::make_heap(heap_.begin(), heap_.end(), greater);
    for (size_t i = top_k; i < logit_.size(); ++i) {
      if (logit_[i] <= heap_.front()) continue;
      std::pop_heap(heap_.begin(), heap_.end(), greater);
      heap_.back() = logit_[i];
      std::push_heap(heap_.begin(), heap_.end(), greater);
    }
    return heap_.front();
  }

  // Tokens lighter than (1 - top_p) * mass / n together weigh less than (1 - top_p) * mass, so the
  // threshold lies above all of them: only the heavier ones go into the selection.
  float top_p_threshold(float keep_from, float top_p) {
    const float* x = logit_.data();
    const float* w = weight_.data();
    const int64_t vocab = static_cast<int64_t>(logit_.size());
    float mass = 0.f, count = 0.f;
#pragma omp simd reduction(+ : mass, count)
    for (int64_t i = 0; i < vocab; ++i) {
      const float kept = static_cast<float>(x[i] >= keep_from);
      mass += kept * w[i];
      count += kept;
    }
    const float light = (1.f - top_p) * mass / count;
    survivors_.clear();
    for (int64_t i = 0; i < vocab; ++i)
      if (x[i] >= keep_from && w[i] >= light) survivors_.emplace_back(x[i], w[i]);
    return weighted_select(survivors_, top_p * mass);
  }

  std::vector<float> logit_, weight_, heap_;
  std::vector<std::pair<float, float>> survivors_;
};

void sample_cpu(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_p,
                const at::Tensor& top_k, const at::Tensor& seeds, const at::Tensor& offsets, at::Tensor& tokens,
                at::Tensor& logprobs) {
  check_sample_args(logits, temperature, top_p, top_k, seeds, offsets, tokens, logprobs);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const float* temp = temperature.const_data_ptr<float>();
  const float* p = top_p.const_data_ptr<float>();
  const int64_t* k = top_k.const_data_ptr<int64_t>();
  const int64_t* seed = seeds.const_data_ptr<int64_t>();
  const int64_t* offset = offsets.const_data_ptr<int64_t>();
  int64_t* token_out = tokens.mutable_data_ptr<int64_t>();
  float* logprob_out = logprobs.mutable_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "sample_cpu", [&] {
    const scalar_t* data = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      RowSampler sampler(vocab);
      for (int64_t r = begin; r < end; ++r) {
        const RowSettings settings{temp[r], p[r], k[r], static_cast<uint64_t>(seed[r]), static_cast<uint64_t>(offset[r])};
        const Draw draw = sampler.sample(data + r * vocab, settings);
        token_out[r] = draw.token;
        logprob_out[r] = draw.logprob;
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mistral_grpc, CPU, m) {
  m.impl("apply_penalties", &apply_penalties_cpu);
  m.impl("sample", &sample_cpu);
}

}  // namespace mistral_grpc
