// Attention of prefill-like tasks on AMX, for bf16 caches (cpu/attention_amx.cpp): scores and P V.
//
// A tile's scores, transposed as the online softmax wants them (scores[key][row]), are one product
// S^T = K Q^T: the A tiles are 16 keys x 32 head dims read from the cache in place (the keys of a
// block sit at one stride), the B tiles are Q^T in the VNNI layout, packed once per task and reused
// by every tile. bf16 x bf16 products are exact and TDPBF16PS sums them in fp32, as the vector
// kernel does after widening, so only the order of the additions differs.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace mistral_grpc::attention_amx {

constexpr int64_t kKeys = 16;      // keys per A tile (rows of a C tile)
constexpr int64_t kRows = 16;      // query rows per B tile (columns of a C tile)
constexpr int64_t kDimBlock = 32;  // head dims per TDPBF16PS

// Whether the CPU has AMX-BF16, this process may use the tile registers and linear_cpu_isa leaves
// the level at "amx".
bool usable();
// Configures (begin) and releases (end) the calling thread's tile registers around a run of tasks.
void begin();
void end();

// uint16s pack_queries writes for `rows` rows: whole 16-row blocks of head_dim.
constexpr int64_t packed_queries_size(int64_t rows, int64_t head_dim) {
  return (rows + kRows - 1) / kRows * kRows * head_dim;
}
// Q^T of rows [0, rows) (row r's head_dim bf16 values at q_rows[r]; head_dim % kDimBlock == 0) as
// B tiles: [16-row block][32-dim block][16 dim pairs][16 rows][2], rows past `rows` zero.
void pack_queries(const c10::BFloat16* const* q_rows, int64_t rows, int64_t head_dim, uint16_t* packed);

// scores[j * padded_rows + r] = scale * (q_r . k_j) for keys j < kt <= 32 (key j's head_dim values at
// keys[j]) and rows r < padded_rows (a multiple of 16; rows past pack_queries' `rows` score 0).
// Rows kt <= j < kt rounded up to 16 are overwritten too. staging: kKeys * head_dim uint16s, for
// the 16 keys of a group that do not sit at one stride (a group across blocks, a partial group).
void score_tile(const uint16_t* packed_q, int64_t padded_rows, int64_t head_dim, const c10::BFloat16* const* keys,
                int64_t kt, float scale, float* scores, uint16_t* staging);

// uint16s accumulate_tile stages: V as B tiles (16 head dims each), then P's two A tiles.
constexpr int64_t pv_staging_size(int64_t head_dim) { return head_dim * 2 * kKeys + 2 * kRows * 2 * kKeys; }
// acc[r] = acc[r] * rescale[r] + sum over keys j < kt <= 32 of probs[j * padded_rows + r] * v_j, for rows
// r < padded_rows (acc: padded_rows x head_dim fp32, row-major; key j's head_dim values at values[j]).
// P V is C += A B with B = V in VNNI pairs of keys (16 head dims a tile; V is bf16 already) and A = P
// (16 rows x 32 keys, transposed from probs' key-major layout) as two bf16 parts, its top 8 bits and
// the rest, so P keeps 16 bits: rounding P to bf16 once (as bf16 flash attention commonly does) made
// the mean error against fp64 1.4x that of the FMA path (bf16 1x512 prefill, 2.07e-4 vs 1.46e-4).
void accumulate_tile(const float* probs, const float* rescale, int64_t padded_rows, const c10::BFloat16* const* values,
                     int64_t kt, int64_t head_dim, float* acc, uint16_t* staging);

}  // namespace mistral_grpc::attention_amx
