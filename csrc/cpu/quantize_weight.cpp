// Quantizing a float weight into the packed int8 / int4 layout of common/quant.h, once, at load.
//
// A tile's 16 rows are quantized side by side, one row per vector lane: each group is transposed so
// that K offset kk of every row is one vfloat, and the group's parameters, searched per row, and q
// lines (16 rows x 4 bytes, one int32 lane per row) come out of lane-wise arithmetic with no
// horizontal sums. Contraction into fmas is off, so every ISA clone makes the same pack.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "cpu/linear_quant.h"
#include "cpu/simd.h"

#pragma GCC optimize("fp-contract=off")

namespace mistral_grpc::linear {
namespace {

using cpu::splat;
using cpu::vfloat;
using cpu::vint;

// Round half to even for |v| < 2^22; larger values stay large and clamp the same way.
MG_ALWAYS_INLINE vfloat round_even(const vfloat& v) {
  const vfloat magic = splat(12582912.f);  // 1.5 * 2^23
  return (v + magic) - magic;
}

MG_ALWAYS_INLINE vfloat clamp(const vfloat& v, float low, float high) {
  const vfloat above = v < low ? splat(low) : v;
  return above > high ? splat(high) : above;
}

MG_ALWAYS_INLINE vfloat min(const vfloat& a, const vfloat& b) { return a < b ? a : b; }

// Each lane as a scale: rounded to the nearest fp16, never below kMinScale.
MG_ALWAYS_INLINE cpu::vfp16 scale_fp16(const vfloat& v) {
  return __builtin_convertvector(cpu::max(v, splat(quant::kMinScale)), cpu::vfp16);
}

MG_ALWAYS_INLINE vfloat fp16_nearest(const vfloat& v) { return __builtin_convertvector(scale_fp16(v), vfloat); }

// Each lane's fp16 at or above it (and kMinScale), so the values a scale was chosen for stay in range.
MG_ALWAYS_INLINE vfloat fp16_at_or_above(const vfloat& v) {
  const cpu::vfp16 half = scale_fp16(v);
  const cpu::vfp16 next = cpu::bit_cast<cpu::vfp16>(cpu::bit_cast<cpu::vbits16>(half) + 1);  // positive, finite
  const vfloat rounded = __builtin_convertvector(half, vfloat);
  return rounded < v ? __builtin_convertvector(next, vfloat) : rounded;
}

// A group's parameters for the 16 rows: weight = (q - zero) * scale, zero a whole number of
// quant::zero_unit (stored by quant::stored_zero).
struct LaneParams {
  vfloat scale, zero;
};

// ---- int8: symmetric per row ------------------------------------------------------------------

MG_ALWAYS_INLINE LaneParams int8_params(const vfloat* values, int64_t count) {
  vfloat max_abs{};
  for (int64_t kk = 0; kk < count; ++kk) max_abs = cpu::max(max_abs, cpu::max(values[kk], -values[kk]));
  return {.scale = fp16_at_or_above(max_abs / 127.f), .zero = splat(static_cast<float>(quant::kInt8Zero))};
}

MG_ALWAYS_INLINE vfloat int8_level(const vfloat& w, const LaneParams& params) {
  return clamp(round_even(w / params.scale) + params.zero, 1.f, 255.f);
}

// ---- int4: asymmetric groups, parameters by search ----------------------------------------------

MG_ALWAYS_INLINE vfloat int4_level(const vfloat& w, const vfloat& inverse, const vfloat& zero) {
  return clamp(round_even(w * inverse + zero), 0.f, 15.f);
}

// Each row's squared error over the group with these (stored) parameters.
MG_ALWAYS_INLINE vfloat int4_error(const vfloat* values, int64_t count, const LaneParams& params) {
  const vfloat inverse = 1.f / params.scale;
  vfloat error{};
  for (int64_t kk = 0; kk < count; ++kk) {
    const vfloat diff = (int4_level(values[kk], inverse, params.zero) - params.zero) * params.scale - values[kk];
    error += diff * diff;
  }
  return error;
}

// The stored form of weight ~= q * scale + minimum: scale in fp16, zero = -minimum / scale in steps.
MG_ALWAYS_INLINE LaneParams int4_stored(const vfloat& scale, const vfloat& minimum) {
  const vfloat stored = fp16_nearest(scale);
  const float unit = quant::zero_unit(4);
  const vfloat zero = clamp(round_even(-minimum / stored / unit), 0.f, 255.f) * unit;
  return {.scale = stored, .zero = zero};
}

struct Candidate {
  vfloat scale, minimum;
};

// The least-squares scale and minimum for the levels this candidate gives each value: the levels are
// fixed by rounding, and the line through them is fitted to the values (the refit of llama.cpp's
// make_qkx2_quants). A row whose levels are all equal keeps its candidate.
MG_ALWAYS_INLINE Candidate refit(const vfloat* values, int64_t count, const vfloat& value_sum, const Candidate& c) {
  const vfloat inverse = 1.f / c.scale, offset = -c.minimum * inverse;
  vfloat level_sum{}, level_squares{}, level_values{};
  for (int64_t kk = 0; kk < count; ++kk) {
    const vfloat q = int4_level(values[kk], inverse, offset);
    level_sum += q;
    level_squares += q * q;
    level_values += q * values[kk];
  }
  const float n = static_cast<float>(count);
  const vfloat det = n * level_squares - level_sum * level_sum;
  const vfloat safe_det = det > 0.f ? det : splat(1.f);
  const vfloat scale = (n * level_values - level_sum * value_sum) / safe_det;
  const vfloat minimum = (value_sum - scale * level_sum) / n;
  const auto fitted = det > 0.f && scale > 0.f;
  return {.scale = fitted ? scale : c.scale, .minimum = fitted ? minimum : c.minimum};
}

// How far each end of the range is pulled in, for the search's candidates.
constexpr std::array<float, 3> kRangeShrinks = {1.f, 0.92f, 0.84f};

// Each row's parameters with the least squared error among: the min-max range with a whole zero point
// (what a plain quantizer does, so the search is never worse), and the range with each end pulled in
// by kRangeShrinks, refitted. The range always holds 0, so a group of zeros is exact.
MG_ALWAYS_INLINE LaneParams int4_params(const vfloat* values, int64_t count) {
  vfloat low{}, high{}, value_sum{};
  for (int64_t kk = 0; kk < count; ++kk) {
    low = min(low, values[kk]);
    high = cpu::max(high, values[kk]);
    value_sum += values[kk];
  }
  const vfloat min_max_scale = fp16_at_or_above((high - low) / 15.f);
  LaneParams best{.scale = min_max_scale, .zero = clamp(round_even(-low / min_max_scale), 0.f, 15.f)};
  vfloat best_error = int4_error(values, count, best);
  for (const float low_shrink : kRangeShrinks) {
    for (const float high_shrink : kRangeShrinks) {
      const vfloat minimum = low * low_shrink;
      const Candidate start{.scale = cpu::max((high * high_shrink - minimum) / 15.f, splat(quant::kMinScale)),
                            .minimum = minimum};
      const Candidate fitted = refit(values, count, value_sum, start);
      const LaneParams params = int4_stored(fitted.scale, fitted.minimum);
      const vfloat error = int4_error(values, count, params);
      const auto better = error < best_error;
      best = {.scale = better ? params.scale : best.scale, .zero = better ? params.zero : best.zero};
      best_error = better ? error : best_error;
    }
  }
  return best;
}

// ---- a tile ------------------------------------------------------------------------------------

// The stored bytes of four K offsets' q values (int4: the low nibbles; `high` the high ones):
// row j's lane becomes bytes 4j..4j+3 of a q line.
MG_ALWAYS_INLINE vint line_words(const vfloat* low, const vfloat* high) {
  vint word{};
  for (int i = 0; i < 4; ++i) {
    vint byte = __builtin_convertvector(low[i], vint);
    if (high != nullptr) byte |= __builtin_convertvector(high[i], vint) << 4;
    word |= byte << (8 * i);
  }
  return word;
}

// The tile's group `g` of unit `unit`: params line and q lines, for the first `rows` rows.
template <int kBits>
MG_ALWAYS_INLINE void quantize_group(uint8_t* tile, const quant::Geometry& geo, const vfloat* group_values,
                                     int64_t count, int64_t g, int64_t unit, int64_t rows) {
  LaneParams params;
  if constexpr (kBits == 8) {
    params = int8_params(group_values, count);
  } else {
    params = int4_params(group_values, count);
  }
  uint8_t* group = tile + geo.group_offset(g, unit);
  auto* gp = reinterpret_cast<quant::GroupParams*>(group);
  for (int64_t j = 0; j < rows; ++j) {
    gp->scale[j] = c10::Half(params.scale[j]);
    gp->zero[j] = quant::stored_zero(kBits, params.zero[j]);
  }
  const vint valid_rows = vint{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} < static_cast<int32_t>(rows);
  const vfloat inverse = 1.f / params.scale;
  constexpr int64_t kPerLine = quant::k_per_line(kBits);
  for (int64_t l = 0; l < geo.group_size / kPerLine; ++l) {
    vfloat levels[kPerLine];
    for (int64_t i = 0; i < kPerLine; ++i) {
      const vfloat w = group_values[l * kPerLine + i];  // past count: the padding's zeros
      if constexpr (kBits == 8) {
        levels[i] = int8_level(w, params);
      } else {
        levels[i] = int4_level(w, inverse, params.zero);
      }
    }
    const vint words = line_words(levels, kBits == 8 ? nullptr : levels + 4) & valid_rows;
    std::memcpy(group + (1 + l) * quant::kLineBytes, &words, quant::kLineBytes);
  }
}

// values[kk][j] = row j's value kk of the group starting at `group` (row stride k), zero past `count`
// and for rows past `rows`. Returns false if a value is a NaN, an infinity or beyond ±quant::kMaxWeight.
template <typename T>
MG_ALWAYS_INLINE bool transpose_group(const T* group, int64_t rows, int64_t k, int64_t count, int64_t group_size,
                                      vfloat* values) {
  std::memset(static_cast<void*>(values), 0, group_size * sizeof(vfloat));
  bool in_range = true;
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t kk = 0; kk < count; ++kk) {
      const float w = static_cast<float>(group[j * k + kk]);
      in_range = in_range && std::fabs(w) <= quant::kMaxWeight;  // false for a NaN too
      values[kk][j] = w;
    }
  }
  return in_range;
}

// One tile of unit `unit` from `rows` rows of `matrix` (row stride k), group by group through `values`,
// a scratch of geo.group_size vfloats. Returns false if the rows hold a value transpose_group refuses.
template <int kBits, typename T>
MG_CPU_CLONES bool quantize_tile(uint8_t* tile, const quant::Geometry& geo, const T* matrix, int64_t rows, int64_t k,
                                 int64_t unit, vfloat* values) {
  for (int64_t g = 0; g < geo.groups(); ++g) {
    // K is padded to whole groups, so every group holds at least one of the rows' values.
    const int64_t first = g * geo.group_size, count = std::min(geo.group_size, k - first);
    if (!transpose_group(matrix + first, rows, k, count, geo.group_size, values)) return false;
    quantize_group<kBits>(tile, geo, values, count, g, unit, rows);
  }
  return true;
}

struct FreeAligned {
  void operator()(vfloat* p) const { std::free(p); }
};

template <typename T>
bool quantize_unit(uint8_t* tiles, const quant::Geometry& geo, const T* matrix, int64_t rows, int64_t k,
                   int64_t unit) {
  std::atomic<bool> in_range{true};
  at::parallel_for(0, tiles_for(rows), 1, [&](int64_t begin, int64_t end) {
    // 64-byte aligned, as the AVX-512 clone reads them: in code built for baseline x86-64 (this one),
    // a vfloat's alignment is only 16.
    const std::unique_ptr<vfloat[], FreeAligned> values(
        static_cast<vfloat*>(std::aligned_alloc(sizeof(vfloat), geo.group_size * sizeof(vfloat))));
    TORCH_CHECK(values != nullptr, "quantize: out of memory");
    for (int64_t t = begin; t < end; ++t) {
      const T* first = matrix + t * kTileRows * k;
      const int64_t tile_rows = std::min(kTileRows, rows - t * kTileRows);
      uint8_t* tile = tiles + t * geo.tile_bytes();
      const bool ok = geo.bits == 8 ? quantize_tile<8>(tile, geo, first, tile_rows, k, unit, values.get())
                                    : quantize_tile<4>(tile, geo, first, tile_rows, k, unit, values.get());
      if (!ok) in_range.store(false, std::memory_order_relaxed);
    }
  });
  return in_range.load();
}

}  // namespace

bool quantize_matrix(uint8_t* tiles, const quant::Geometry& geo, const at::Tensor& matrix, int64_t unit) {
  const at::Tensor m = matrix.contiguous();
  const int64_t rows = m.size(0), k = m.size(1);
  switch (m.scalar_type()) {
    case at::kFloat:
      return quantize_unit(tiles, geo, m.data_ptr<float>(), rows, k, unit);
    case at::kBFloat16:
      return quantize_unit(tiles, geo, m.data_ptr<c10::BFloat16>(), rows, k, unit);
    default:
      return quantize_unit(tiles, geo, m.data_ptr<c10::Half>(), rows, k, unit);
  }
}

}  // namespace mistral_grpc::linear
