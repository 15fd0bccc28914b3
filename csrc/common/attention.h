// Paged-attention math shared by the CPU and CUDA kernels: which cache positions a query sees,
// and the online (flash-style) softmax in base 2.
//
// Scores are kept in the log2 domain (q is pre-multiplied by scale * log2(e)) so every
// exponential is an exp2. V is a float on CUDA and a vector of floats (one per query row) on CPU.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace mistral_grpc {

constexpr float kLog2e = 1.4426950408889634f;

// Sequence b's q rows are its last q_len positions: query i sits at seq_len - q_len + i.
MG_HOST_DEVICE int64_t query_position(int64_t seq_len, int64_t q_len, int64_t i) { return seq_len - q_len + i; }

// The first cache position the query at `pos` attends to: 0, or with a sliding window of W > 0
// the W positions ending at its own (HF/Mistral: keys in (pos - W, pos]).
MG_HOST_DEVICE int64_t first_visible_key(int64_t pos, int64_t sliding_window) {
  return (sliding_window > 0 && pos - sliding_window + 1 > 0) ? pos - sliding_window + 1 : 0;
}

// Causal with the optional window: keys in [first_visible_key(pos), pos].
MG_HOST_DEVICE bool key_visible(int64_t key, int64_t pos, int64_t sliding_window) {
  return key <= pos && key >= first_visible_key(pos, sliding_window);
}

// Folds a tile's maximum score into a row's running maximum. Returns the factor that rescales the
// sum and output accumulated so far; `base` receives what the tile's scores subtract before exp2.
// While a row has seen no visible key its maximum stays -inf and base is 0, so its masked
// (-inf) scores give exp2(-inf) = 0 and never NaN.
template <typename V, typename Exp2>
MG_HOST_DEVICE V online_softmax_update(V& running_max, const V& tile_max, V& base, Exp2 exp2) {
  const V new_max = running_max > tile_max ? running_max : tile_max;
  base = new_max == -INFINITY ? V{} : new_max;
  const V rescale = exp2(running_max - base);
  running_max = new_max;
  return rescale;
}

// Merging two partial softmax states (max, sum) of disjoint key sets: each side's outputs and
// sums are scaled by exp2(its max - the common max). Returns the common max (finite if either is).
template <typename Exp2>
MG_HOST_DEVICE float merge_softmax_weights(float max_a, float max_b, float& weight_a, float& weight_b, Exp2 exp2) {
  const float common = max_a > max_b ? max_a : max_b;
  const float base = common == -INFINITY ? 0.f : common;
  weight_a = exp2(max_a - base);
  weight_b = exp2(max_b - base);
  return common;
}

}  // namespace mistral_grpc
