// Attention scores of prefill-like tasks on AMX, for bf16 caches (cpu/attention_amx.cpp).
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

// Whether the CPU has AMX-BF16 and this process may use the tile registers.
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

}  // namespace mistral_grpc::attention_amx
