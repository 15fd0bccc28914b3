// Per-element math of the penalty and sampling kernels, shared by CPU and CUDA.
//
// The rule for one row (temperature > 0), stated once here and implemented by both devices:
//   1. weight_i = exp((x_i - max_x) / T), where x are the logits after penalties (sanitized below).
//   2. top-k (k > 0): keep every token whose logit is >= the k-th largest logit (ties kept).
//   3. top-p (< 1): among the top-k survivors, the threshold is the largest logit value v such
//      that the survivors with logit >= v carry weight >= top_p * (weight of all survivors).
//      Tokens with logit >= v are kept: that is the smallest set in descending order reaching
//      the mass, plus every token tied with the last one, so it does not depend on sort order.
//      The largest logit always survives, so the set is never empty.
//   4. u = philox_uniform(seed, offset); the token is the first survivor, in token-id order,
//      whose running weight exceeds u * (total survivor weight).
// Thresholds are logit values, not probabilities: logits tie exactly where probabilities might
// round together, and both devices search them exactly through order_key below: CUDA bisects
// over the whole row with block reductions; the CPU keeps a heap for top-k and bisects top-p over
// the few tokens heavy enough to matter.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace mistral_grpc {

// NaN can never be chosen (it becomes -inf), +inf is capped so max - x stays finite, and -0.0
// becomes +0.0 so equal logits always have equal order keys. V is a float on CUDA and a vector of
// floats on CPU.
template <typename V>
MG_HOST_DEVICE V sanitize_logit(const V& x) {
  const V not_nan = x == x ? x : V{} - INFINITY;
  const V capped = not_nan < FLT_MAX ? not_nan : V{} + FLT_MAX;
  return capped + 0.f;  // -0 + 0 = +0
}

// A monotone map from floats to uint32: a < b  <=>  order_key(a) < order_key(b) (no NaN, and
// +0.0 only, after sanitize_logit). Lets thresholds be bisected exactly, over integers.
MG_HOST_DEVICE uint32_t order_key(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

MG_HOST_DEVICE float from_order_key(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  float x;
  memcpy(&x, &bits, sizeof(x));
  return x;
}

// The largest key in [lo, hi] where `holds` is true, for a `holds` that is monotone (true up to
// some key, false above) and taken to be true at lo: a bisection, at most 32 evaluations. Both
// devices find the top-p threshold (CUDA also top-k's) with it, `holds` reducing over the row.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename Holds>
MG_HOST_DEVICE uint32_t largest_key_where(uint32_t lo, uint32_t hi, Holds holds) {
  while (lo < hi) {
    const uint32_t mid = lo + static_cast<uint32_t>((static_cast<uint64_t>(hi) - lo + 1) / 2);
    if (holds(mid)) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Greedy's order: a higher logit wins, and on a tie the lower token id.
MG_HOST_DEVICE bool greedy_prefers(float a, int64_t a_index, float b, int64_t b_index) {
  return a > b || (a == b && a_index < b_index);
}

// The exponent of a token's unnormalised probability at temperature T, relative to the row's
// largest logit: weight = exp(weight_exponent) <= 1. Each device brings its own exp (CUDA's
// intrinsic, cpu/simd.h's polynomial).
template <typename V>
MG_HOST_DEVICE V weight_exponent(const V& x, float max_logit, float temperature) {
  return (x - max_logit) / temperature;
}

MG_HOST_DEVICE bool top_k_active(int64_t top_k, int64_t vocab) { return top_k > 0 && top_k < vocab; }

MG_HOST_DEVICE bool top_p_active(float top_p) { return top_p < 1.f; }

// The inverse-CDF step: token i is chosen when the running weight through i passes the target.
template <typename Sum>
MG_HOST_DEVICE bool passes_target(Sum running_weight, Sum target) {
  return running_weight > target;
}

// --- Penalties -----------------------------------------------------------------------------

MG_HOST_DEVICE bool penalties_neutral(float repetition, float presence, float frequency) {
  return repetition == 1.f && presence == 0.f && frequency == 0.f;
}

// One token's penalised logit. `output_count` is how often it was generated, `seen` whether it
// appears in the prompt or the output. Repetition first (Keskar et al. / Hugging Face: divide a
// positive logit, multiply a negative one), then OpenAI's additive
// `- count * frequency - (count > 0) * presence`, as vLLM orders them.
MG_HOST_DEVICE float penalized_logit(float x, int32_t output_count, bool seen, float repetition, float presence,
                                     float frequency) {
  if (seen) x = x > 0.f ? x / repetition : x * repetition;
  if (output_count > 0) x -= static_cast<float>(output_count) * frequency + presence;
  return x;
}

}  // namespace mistral_grpc
