// Prefill attention on AMX (see cpu/attention_amx.h). Scores: each group of 16 keys is one A tile per
// 32 head dims; up to four 16-row blocks of queries (64 rows, a prefill-like task's size) take the
// four C tiles, so an A tile is loaded once per four TDPBF16PS (tmm0..3 C, tmm4 A, tmm5..7 B).
// P V: per 16-row block, P's two A tiles (tmm3, 4) against the B tiles of V, 16 head dims each,
// three at a time (tmm5..7), C being the rows' acc in place (tmm0..2).
#include "cpu/attention_amx.h"

#include "common/linear_kernels.h"
#include "cpu/ops_cpu.h"
#include "cpu/simd.h"

#if MG_LINEAR_X86_KERNELS
#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <utility>

#include "cpu/amx_tiles.h"

namespace mistral_grpc::attention_amx {

bool usable() { return cpu_amx_selected(); }

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16")

void begin() {
  static constexpr cpu::TileConfig kConfig = cpu::full_tiles();
  _tile_loadconfig(&kConfig);
}

void end() { _tile_release(); }

void pack_queries(const c10::BFloat16* const* q_rows, int64_t rows, int64_t head_dim, uint16_t* packed) {
  const int64_t dim_blocks = head_dim / kDimBlock;
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    for (int64_t d0 = 0; d0 < head_dim; d0 += kDimBlock) {
      uint16_t* tile = packed + (r0 / kRows * dim_blocks + d0 / kDimBlock) * kRows * kDimBlock;
      for (int64_t pair = 0; pair < kDimBlock / 2; ++pair) {
        for (int64_t n = 0; n < kRows; ++n) {
          const int64_t r = r0 + n;
          tile[(pair * kRows + n) * 2] = r < rows ? q_rows[r][d0 + 2 * pair].x : 0;
          tile[(pair * kRows + n) * 2 + 1] = r < rows ? q_rows[r][d0 + 2 * pair + 1].x : 0;
        }
      }
    }
  }
}

namespace {

// Where the A tiles of keys [0, n) come from: in place when all 16 are there at one stride (the
// keys of one cache block), else copied into staging with zeros past n.
std::pair<const void*, int64_t> key_tile_rows(const c10::BFloat16* const* keys, int64_t n, int64_t head_dim,
                                              uint16_t* staging) {
  if (n == kKeys) {
    const std::ptrdiff_t step = keys[1] - keys[0];
    bool even = true;
    for (int64_t j = 2; j < kKeys; ++j) even &= keys[j] - keys[j - 1] == step;
    if (even) return {keys[0], step * static_cast<int64_t>(sizeof(c10::BFloat16))};
  }
  for (int64_t j = 0; j < kKeys; ++j) {
    uint16_t* row = staging + j * head_dim;
    if (j < n) {
      std::memcpy(row, keys[j], head_dim * sizeof(uint16_t));
    } else {
      std::fill(row, row + head_dim, uint16_t{0});
    }
  }
  return {staging, head_dim * static_cast<int64_t>(sizeof(uint16_t))};
}

}  // namespace

void score_tile(const uint16_t* packed_q, int64_t padded_rows, int64_t head_dim, const c10::BFloat16* const* keys,
                int64_t kt, float scale, float* scores, uint16_t* staging) {
  const int64_t row_blocks = padded_rows / kRows, dim_blocks = head_dim / kDimBlock;
  const int64_t b_block = dim_blocks * kRows * kDimBlock;  // uint16s of one row block's B tiles
  const int64_t c_stride = padded_rows * static_cast<int64_t>(sizeof(float));
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < kt; j0 += kKeys) {
    const int64_t n = std::min(kKeys, kt - j0);
    const auto [a, a_stride] = key_tile_rows(keys + j0, n, head_dim, staging);
    for (int64_t rb = 0; rb < row_blocks; rb += 4) {
      const int64_t blocks = std::min<int64_t>(4, row_blocks - rb);
      const uint16_t* b = packed_q + rb * b_block;
      float* c = scores + j0 * padded_rows + rb * kRows;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t d = 0; d < dim_blocks; ++d) {
        const uint16_t* bd = b + d * kRows * kDimBlock;
        _tile_loadd(4, static_cast<const uint8_t*>(a) + d * kDimBlock * sizeof(uint16_t), a_stride);
        _tile_loadd(5, bd, 64);
        _tile_dpbf16ps(0, 4, 5);
        if (blocks > 1) {
          _tile_loadd(6, bd + b_block, 64);
          _tile_dpbf16ps(1, 4, 6);
        }
        if (blocks > 2) {
          _tile_loadd(7, bd + 2 * b_block, 64);
          _tile_dpbf16ps(2, 4, 7);
        }
        if (blocks > 3) {
          _tile_loadd(5, bd + 3 * b_block, 64);
          _tile_dpbf16ps(3, 4, 5);
        }
      }
      _tile_stored(0, c, c_stride);
      if (blocks > 1) _tile_stored(1, c + kRows, c_stride);
      if (blocks > 2) _tile_stored(2, c + 2 * kRows, c_stride);
      if (blocks > 3) _tile_stored(3, c + 3 * kRows, c_stride);
    }
    for (int64_t j = j0; j < j0 + n; ++j) {
      for (int64_t r = 0; r < padded_rows; r += kRows) {
        float* score = scores + j * padded_rows + r;
        _mm512_storeu_ps(score, _mm512_mul_ps(_mm512_loadu_ps(score), scale_v));
      }
    }
  }
}

namespace {

// 16 x 16 transpose of 32-bit elements, r[i] being row i. (The maskz forms with every lane set: the
// plain intrinsics trip a false -Wmaybe-uninitialized in GCC 12; the instructions are the same.)
MG_ALWAYS_INLINE void transpose16(__m512i r[16]) {
  constexpr __mmask16 k32 = 0xffff;
  constexpr __mmask8 k64 = 0xff;
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_maskz_unpacklo_epi32(k32, r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_maskz_unpackhi_epi32(k32, r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_maskz_unpacklo_epi64(k64, t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_maskz_unpackhi_epi64(k64, t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_maskz_unpacklo_epi64(k64, t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_maskz_unpackhi_epi64(k64, t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_maskz_shuffle_i32x4(k32, u[i], u[4 + i], 0x88);
    t[4 + i] = _mm512_maskz_shuffle_i32x4(k32, u[i], u[4 + i], 0xdd);
    t[8 + i] = _mm512_maskz_shuffle_i32x4(k32, u[8 + i], u[12 + i], 0x88);
    t[12 + i] = _mm512_maskz_shuffle_i32x4(k32, u[8 + i], u[12 + i], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_maskz_shuffle_i32x4(k32, t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_maskz_shuffle_i32x4(k32, t[i], t[8 + i], 0xdd);
    r[4 + i] = _mm512_maskz_shuffle_i32x4(k32, t[4 + i], t[12 + i], 0x88);
    r[12 + i] = _mm512_maskz_shuffle_i32x4(k32, t[4 + i], t[12 + i], 0xdd);
  }
}

// 16-bit lane indices (even + n, odd + n) for n < 16, for the permutes that pair two vectors' lanes.
__m512i pair_lanes(int even, int odd) {
  alignas(64) int16_t index[32];
  for (int n = 0; n < 16; ++n) {
    index[2 * n] = static_cast<int16_t>(even + n);
    index[2 * n + 1] = static_cast<int16_t>(odd + n);
  }
  return _mm512_load_si512(index);
}

}  // namespace

void accumulate_tile(const float* probs, const float* rescale, int64_t padded_rows, const c10::BFloat16* const* values,
                     int64_t kt, int64_t head_dim, float* acc, uint16_t* staging) {
  const int64_t dim_tiles = head_dim / kRows, c_stride = head_dim * static_cast<int64_t>(sizeof(float));
  constexpr int64_t kPairs = kKeys;  // 32 keys a tile: 16 pairs
  uint16_t* v_tiles = staging;       // [16-dim block][key pair][16 dims][2]
  uint16_t* p_high = staging + head_dim * 2 * kKeys;  // [16 rows][32 keys], P's top 8 bits
  uint16_t* p_low = p_high + kRows * 2 * kKeys;         // the rest, rounded to 8 bits
  // permutex2var(even, index, odd) lanes: even's are 0-31, odd's 32-63.
  const __m512i low_dims = pair_lanes(0, 32), high_dims = pair_lanes(16, 48);
  for (int64_t pair = 0; pair < kPairs; ++pair) {
    const int64_t j = 2 * pair;
    for (int64_t d = 0; d < head_dim; d += 2 * kRows) {
      const __m512i even = j < kt ? _mm512_loadu_si512(values[j] + d) : _mm512_setzero_si512();
      const __m512i odd = j + 1 < kt ? _mm512_loadu_si512(values[j + 1] + d) : _mm512_setzero_si512();
      uint16_t* row = v_tiles + ((d / kRows) * kPairs + pair) * 2 * kRows;
      _mm512_storeu_si512(row, _mm512_permutex2var_epi16(even, low_dims, odd));
      _mm512_storeu_si512(row + kPairs * 2 * kRows, _mm512_permutex2var_epi16(even, high_dims, odd));
    }
  }
  // cvtne2ps_pbh(odd, even) holds even's 16 rows, then odd's: interleaved, each row's (even, odd) pair.
  const __m512i pairs_of_rows = pair_lanes(0, 16);
  const __m512 ones = _mm512_set1_ps(1.f);
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t r0 = 0; r0 < padded_rows; r0 += kRows) {
    float* c = acc + r0 * head_dim;
    if (_mm512_cmp_ps_mask(_mm512_loadu_ps(rescale + r0), ones, _CMP_NEQ_UQ) != 0) {
      for (int64_t n = 0; n < kRows; ++n) {
        const __m512 factor = _mm512_set1_ps(rescale[r0 + n]);
        for (int64_t d = 0; d < head_dim; d += kRows) {
          float* x = c + n * head_dim + d;
          _mm512_storeu_ps(x, _mm512_mul_ps(_mm512_loadu_ps(x), factor));
        }
      }
    }
    // Row `pair`: each of the 16 rows' (key 2 pair, key 2 pair + 1) probabilities, as two bf16 parts:
    // the top 8 significant bits (exact) and the rest rounded, together within 2^-17 of P.
    __m512i high[kPairs], low[kPairs];
    for (int64_t pair = 0; pair < kPairs; ++pair) {
      const int64_t j = 2 * pair;
      const __m512 even = j < kt ? _mm512_loadu_ps(probs + j * padded_rows + r0) : _mm512_setzero_ps();
      const __m512 odd = j + 1 < kt ? _mm512_loadu_ps(probs + (j + 1) * padded_rows + r0) : _mm512_setzero_ps();
      const __m512 even_high = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(even), top));
      const __m512 odd_high = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(odd), top));
      high[pair] = _mm512_permutexvar_epi16(pairs_of_rows,
                                            reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(odd_high, even_high)));
      low[pair] = _mm512_permutexvar_epi16(
          pairs_of_rows, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_sub_ps(odd, odd_high),
                                                                       _mm512_sub_ps(even, even_high))));
    }
    transpose16(high);  // now row n: query row r0 + n's 32 probabilities, as an A tile row
    transpose16(low);
    for (int64_t n = 0; n < kRows; ++n) {
      _mm512_storeu_si512(p_high + n * 2 * kKeys, high[n]);
      _mm512_storeu_si512(p_low + n * 2 * kKeys, low[n]);
    }
    _tile_loadd(4, p_high, 64);
    _tile_loadd(3, p_low, 64);
    // Three C tiles at a time (acc of 48 head dims), so their loads, products and stores overlap.
    const uint16_t* v = v_tiles;
    constexpr int64_t kVTile = kPairs * 2 * kRows;
    int64_t t = 0;
    for (; t + 3 <= dim_tiles; t += 3) {
      float* ct = c + t * kRows;
      _tile_loadd(0, ct, c_stride);
      _tile_loadd(1, ct + kRows, c_stride);
      _tile_loadd(2, ct + 2 * kRows, c_stride);
      _tile_loadd(5, v + t * kVTile, 64);
      _tile_loadd(6, v + (t + 1) * kVTile, 64);
      _tile_loadd(7, v + (t + 2) * kVTile, 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(1, 4, 6);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(0, 3, 5);
      _tile_dpbf16ps(1, 3, 6);
      _tile_dpbf16ps(2, 3, 7);
      _tile_stored(0, ct, c_stride);
      _tile_stored(1, ct + kRows, c_stride);
      _tile_stored(2, ct + 2 * kRows, c_stride);
    }
    for (; t < dim_tiles; ++t) {
      _tile_loadd(0, c + t * kRows, c_stride);
      _tile_loadd(5, v + t * kVTile, 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(0, 3, 5);
      _tile_stored(0, c + t * kRows, c_stride);
    }
  }
}

#pragma GCC pop_options

}  // namespace mistral_grpc::attention_amx

#else  // no x86 kernels: never usable, so the rest is never called

namespace mistral_grpc::attention_amx {

bool usable() { return false; }
void begin() {}
void end() {}
void pack_queries(const c10::BFloat16* const*, int64_t, int64_t, uint16_t*) {}
void score_tile(const uint16_t*, int64_t, int64_t, const c10::BFloat16* const*, int64_t, float, float*, uint16_t*) {}
void accumulate_tile(const float*, const float*, int64_t, const c10::BFloat16* const*, int64_t, int64_t, float*,
                     uint16_t*) {}

}  // namespace mistral_grpc::attention_amx

#endif
