// Penalty and sampling kernels on CPU, rows split across threads (at::parallel_for). Sampling
// follows the rule of common/sampling.h and finds its thresholds by selection rather than sorting
// (a bounded heap for top-k, a weighted quickselect for top-p), so a row costs O(V).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "common/dispatch.h"
#include "common/philox.h"
#include "common/sampling.h"
#include "cpu/simd.h"
#include "ops.h"

namespace mistral_grpc {

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
  MG_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "apply_penalties_cpu", [&] {
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

using cpu::kLanes;
using cpu::vfloat;

// The inverse CDF's sums are double: in float each weight below half an ulp of the sum so far rounds
// away, so a peaked row's long tail of tiny weights (together ~1e-3 of the mass, say) lost its draws,
// the walk's to its last token and the vectorised total's (whose lanes drop them after a large
// weight) to tokens a thousand ids early.
using vdouble = double __attribute__((vector_size(64)));

MG_ALWAYS_INLINE void add_in_double(vdouble& sum, const vfloat& v) {
  using vhalf = float __attribute__((vector_size(32)));
  const vhalf low = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const vhalf high = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  sum += __builtin_convertvector(low, vdouble) + __builtin_convertvector(high, vdouble);
}

MG_ALWAYS_INLINE double reduce_sum(const vdouble& sum) {
  double total = 0.;
  for (int j = 0; j < 8; ++j) total += sum[j];
  return total;
}

MG_ALWAYS_INLINE float reduce_max(const vfloat& v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

MG_ALWAYS_INLINE bool any_lane(const cpu::vint& mask) {
  int32_t any = 0;
  for (int i = 0; i < kLanes; ++i) any |= mask[i];
  return any != 0;
}

// A thread's sampling scratch, kept from call to call: vectors made fresh for each call cost a page
// fault per 4 KiB, four of 128 KiB for a 32k vocabulary (most of a batch-1 decode step's sampling).
struct SamplerScratch {
  std::vector<float> logit, weight, heap, heavy_logit, heavy_weight;
};

SamplerScratch& thread_scratch(int64_t padded) {
  thread_local SamplerScratch scratch;
  for (std::vector<float>* v : {&scratch.logit, &scratch.weight, &scratch.heavy_logit, &scratch.heavy_weight}) {
    if (static_cast<int64_t>(v->size()) < padded) v->resize(padded);
  }
  return scratch;
}

// Samples one row at a time over its thread's scratch. Whole-row passes run in cpu::vfloat steps
// over scratch padded to whole vectors with -inf logits (weight 0, never chosen); the top-k heap
// and the inverse-CDF walk are scalar.
class RowSampler {
 public:
  explicit RowSampler(int64_t vocab) : RowSampler(vocab, thread_scratch(cpu::round_up_to_lanes(vocab))) {}

  template <typename T>
  MG_ALWAYS_INLINE Draw sample(const T* row, const RowSettings& settings) {
    const auto [max_logit, best] = load_logits(row);
    if (settings.temperature == 0.f || max_logit == -INFINITY) {
      return {.token = best, .logprob = max_logit - log_normalizer(max_logit)};
    }
    const double total = fill_weights(max_logit, settings.temperature);
    const float log_norm =
        settings.temperature == 1.f ? max_logit + static_cast<float>(std::log(total)) : log_normalizer(max_logit);

    float keep_from = -INFINITY;
    if (top_k_active(settings.top_k, vocab_)) keep_from = top_k_threshold(settings.top_k);
    if (top_p_active(settings.top_p)) {
      const float mass = keep_from == -INFINITY ? static_cast<float>(total) : weight_from(keep_from);
      keep_from = top_p_threshold(keep_from, settings.top_p, mass, max_logit, settings.temperature);
    }
    const float* x = logit_.data();
    const float* w = weight_.data();
    const double kept = keep_from == -INFINITY ? total : kept_weight(keep_from);
    const double target = philox_uniform(settings.seed, settings.offset) * kept;
    double running = 0.;
    int64_t last = best;
    for (int64_t i = 0; i < vocab_; ++i) {
      if (x[i] < keep_from || w[i] == 0.f) continue;
      running += w[i];
      last = i;
      if (passes_target(running, target)) break;
    }
    // Without a crossing (the two double sums differing by a rounding) `last` is the CDF's end.
    return {.token = last, .logprob = x[last] - log_norm};
  }

 private:
  // Sanitized logits into the scratch (the padding lanes -inf); returns their maximum and where it
  // first occurs (greedy's tie-break). Each lane keeps the index of its own first maximum as it goes,
  // which spares a second pass to find it (a scalar search was a third of a greedy row's time).
  template <typename T>
  MG_ALWAYS_INLINE std::pair<float, int64_t> load_logits(const T* row) {
    const cpu::vint lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    vfloat max = cpu::splat(-INFINITY);
    cpu::vint at = lane;
    cpu::for_each_lane_step(vocab_, [&](int64_t i, int64_t n) {
      const vfloat loaded = sanitize_logit(cpu::load_n(row + i, n));
      const vfloat v = lane < static_cast<int32_t>(n) ? loaded : cpu::splat(-INFINITY);
      cpu::store(logit_.data() + i, v);
      const cpu::vint higher = v > max;
      at = higher ? lane + static_cast<int32_t>(i) : at;
      max = higher ? v : max;
    });
    const float best = reduce_max(max);
    int32_t first = INT32_MAX;  // all -inf: no lane moved, so token 0, as with any other first maximum
    for (int i = 0; i < kLanes; ++i) {
      if (max[i] == best && at[i] < first) first = at[i];
    }
    return {best, first};
  }

  // log(sum(exp(logits))) at temperature 1, for the returned log-probability.
  MG_ALWAYS_INLINE float log_normalizer(float max_logit) const {
    if (max_logit == -INFINITY) return NAN;  // every logit -inf: no distribution to speak of
    vfloat sum{};
    for (int64_t i = 0; i < padded_; i += kLanes) sum += cpu::Exp{}(cpu::load(logit_.data() + i) - max_logit);
    return max_logit + std::log(cpu::reduce_sum(sum));
  }

  MG_ALWAYS_INLINE double fill_weights(float max_logit, float temperature) {
    vdouble sum{};
    for (int64_t i = 0; i < padded_; i += kLanes) {
      const vfloat w = cpu::Exp{}(weight_exponent(cpu::load(logit_.data() + i), max_logit, temperature));
      cpu::store(weight_.data() + i, w);
      add_in_double(sum, w);
    }
    return reduce_sum(sum);
  }

  // The k-th largest logit: a min-heap of the k largest seen so far, so a logit costs one compare
  // with the heap's least unless it enters (about k log(V/k) times in all for unordered logits).
  MG_ALWAYS_INLINE float top_k_threshold(int64_t top_k) {
    const auto greater = std::greater<float>();
    heap_.assign(logit_.begin(), logit_.begin() + top_k);
    std::make_heap(heap_.begin(), heap_.end(), greater);
    for (int64_t i = top_k; i < vocab_; ++i) {
      if (logit_[i] <= heap_.front()) continue;
      std::pop_heap(heap_.begin(), heap_.end(), greater);
      heap_.back() = logit_[i];
      std::push_heap(heap_.begin(), heap_.end(), greater);
    }
    return heap_.front();
  }

  // The weight of the tokens with logit >= from.
  MG_ALWAYS_INLINE float weight_from(float from) const {
    vfloat sum{};
    for (int64_t i = 0; i < padded_; i += kLanes)
      sum += cpu::load(logit_.data() + i) >= from ? cpu::load(weight_.data() + i) : vfloat{};
    return cpu::reduce_sum(sum);
  }

  // The weight of the tokens with logit >= from, in double (the inverse CDF's total).
  MG_ALWAYS_INLINE double kept_weight(float from) const {
    vdouble sum{};
    for (int64_t i = 0; i < padded_; i += kLanes) {
      add_in_double(sum, cpu::load(logit_.data() + i) >= from ? cpu::load(weight_.data() + i) : vfloat{});
    }
    return reduce_sum(sum);
  }

  // The top-p threshold among the tokens with logit >= keep_from (weighing `mass` together), by
  // bisection over order keys. Tokens lighter than (1 - top_p) * mass / V together weigh less than
  // (1 - top_p) * mass, so the threshold lies above all of them: only tokens whose logit puts
  // them above that weight (less a margin for rounding) are gathered and searched.
  MG_ALWAYS_INLINE float top_p_threshold(float keep_from, float top_p, float mass, float max_logit,
                                         float temperature) {
    const float light = max_logit + temperature * (std::log((1.f - top_p) * mass / vocab_) - 1e-3f);
    const float floor = std::max(keep_from, light);
    const float* x = logit_.data();
    const float* w = weight_.data();
    float* heavy_x = heavy_logit_.data();
    float* heavy_w = heavy_weight_.data();
    int64_t heavy = 0;
    for (int64_t i = 0; i < padded_; i += kLanes) {
      if (!any_lane(cpu::load(x + i) >= floor)) continue;  // most vectors, for peaked logits
      for (int64_t j = i; j < i + kLanes; ++j) {  // branch-free: only heavy tokens advance the end
        heavy_x[heavy] = x[j];
        heavy_w[heavy] = w[j];
        heavy += x[j] >= floor;
      }
    }
    const int64_t padded = cpu::round_up_to_lanes(heavy);
    std::fill(heavy_x + heavy, heavy_x + padded, -INFINITY);
    std::fill(heavy_w + heavy, heavy_w + padded, 0.f);
    const float target = top_p * mass;
    const uint32_t key = largest_key_where(order_key(floor), order_key(max_logit), [&](uint32_t candidate) {
      const float from = from_order_key(candidate);
      vfloat above{};
      for (int64_t i = 0; i < padded; i += kLanes)
        above += cpu::load(heavy_x + i) >= from ? cpu::load(heavy_w + i) : vfloat{};
      return cpu::reduce_sum(above) >= target;
    });
    return from_order_key(key);
  }

  RowSampler(int64_t vocab, SamplerScratch& scratch)
      : vocab_(vocab),
        padded_(cpu::round_up_to_lanes(vocab)),
        logit_(scratch.logit),
        weight_(scratch.weight),
        heap_(scratch.heap),
        heavy_logit_(scratch.heavy_logit),
        heavy_weight_(scratch.heavy_weight) {}

  int64_t vocab_, padded_;
  std::vector<float>& logit_;
  std::vector<float>& weight_;
  std::vector<float>& heap_;
  std::vector<float>& heavy_logit_;
  std::vector<float>& heavy_weight_;
};

struct SampleBatch {
  int64_t vocab;
  const float* temperature;
  const float* top_p;
  const int64_t* top_k;
  const int64_t* seeds;
  const int64_t* offsets;
  int64_t* tokens;
  float* logprobs;
};

template <typename T>
MG_CPU_CLONES void sample_rows(const T* logits, const SampleBatch& b, int64_t begin, int64_t end) {
  RowSampler sampler(b.vocab);
  for (int64_t r = begin; r < end; ++r) {
    const RowSettings settings{.temperature = b.temperature[r],
                               .top_p = b.top_p[r],
                               .top_k = b.top_k[r],
                               .seed = static_cast<uint64_t>(b.seeds[r]),
                               .offset = static_cast<uint64_t>(b.offsets[r])};
    const Draw draw = sampler.sample(logits + r * b.vocab, settings);
    b.tokens[r] = draw.token;
    b.logprobs[r] = draw.logprob;
  }
}

void sample_cpu(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_p,
                const at::Tensor& top_k, const at::Tensor& seeds, const at::Tensor& offsets, at::Tensor& tokens,
                at::Tensor& logprobs) {
  check_sample_args(logits, temperature, top_p, top_k, seeds, offsets, tokens, logprobs);
  const SampleBatch batch{.vocab = logits.size(1),
                          .temperature = temperature.const_data_ptr<float>(),
                          .top_p = top_p.const_data_ptr<float>(),
                          .top_k = top_k.const_data_ptr<int64_t>(),
                          .seeds = seeds.const_data_ptr<int64_t>(),
                          .offsets = offsets.const_data_ptr<int64_t>(),
                          .tokens = tokens.mutable_data_ptr<int64_t>(),
                          .logprobs = logprobs.mutable_data_ptr<float>()};
  MG_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "sample_cpu", [&] {
    const scalar_t* data = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, logits.size(0), 1,
                     [&](int64_t begin, int64_t end) { sample_rows(data, batch, begin, end); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mistral_grpc, CPU, m) {
  m.impl("apply_penalties", &apply_penalties_cpu);
  m.impl("sample", &sample_cpu);
}

}  // namespace mistral_grpc
