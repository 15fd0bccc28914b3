// Prefill attention scores on AMX (see cpu/attention_amx.h). Each group of 16 keys is one A tile per
// 32 head dims; up to four 16-row blocks of queries (64 rows, a prefill-like task's size) take the
// four C tiles, so an A tile is loaded once per four TDPBF16PS. tmm0..3: C; tmm4: A; tmm5..7: B.
#include "cpu/attention_amx.h"

#include "common/linear_kernels.h"

#if MG_LINEAR_X86_KERNELS
#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <utility>

#include "cpu/amx_tiles.h"

namespace mistral_grpc::attention_amx {

bool usable() { return linear::amx_usable(); }

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f")

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

#pragma GCC pop_options

}  // namespace mistral_grpc::attention_amx

#else  // no x86 kernels: never usable, so the rest is never called

namespace mistral_grpc::attention_amx {

bool usable() { return false; }
void begin() {}
void end() {}
void pack_queries(const c10::BFloat16* const*, int64_t, int64_t, uint16_t*) {}
void score_tile(const uint16_t*, int64_t, int64_t, const c10::BFloat16* const*, int64_t, float, float*, uint16_t*) {}

}  // namespace mistral_grpc::attention_amx

#endif
