// Linear layers for large batches on AMX: bf16, and fp32 through exact bf16 parts (below, "fp32").
// The packed bf16 tile (common/linear_pack.h) holds, per 64-byte line, 16 outputs x one (even, odd)
// K pair: 16 consecutive lines are exactly an AMX B tile in its VNNI layout (16 pair-rows x 16
// columns), so TDPBF16PS reads the weights as they are packed for the small-batch kernels; A tiles
// are 16 rows x 32 K of x, read in place.
//
// Blocking: 2 x 2 C tiles (32 rows of x against 2 sets of 16 outputs: two neighbouring tiles for
// linear, the gate and up halves of one tile for silu_mul), the classic register tiling that
// loads 2 A and 2 B tiles per 4 TDPBF16PS. The 32 rows' sums go through the same epilogues as
// the vector kernels.
#include "common/linear_kernels.h"
#include "cpu/amx_tiles.h"

#if MG_LINEAR_X86_KERNELS
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <vector>

namespace mistral_grpc::linear {
namespace {

// Linux: a process must ask before it uses the tile data registers (their state is 8 KiB).
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

using cpu::full_tiles;
using cpu::TileConfig;

bool request_amx() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amx_bf16 = (edx >> 22) & 1, amx_tile = (edx >> 24) & 1;
  return amx_bf16 && amx_tile && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")

// Where both kernels find their operands, with the tile registers configured for this thread.
// tmm0..3: C (rows 0-15 | 16-31) x (outputs set 0 | 1); tmm4, 5: A (rows 0-15, 16-31);
// tmm6, 7: B (outputs set 0, 1).
template <int kUnits>
struct AmxOperands {
  static constexpr int64_t kBStride = kUnits * kStepBytes;  // a sub-tile's consecutive lines
  static constexpr int64_t kBBlock = kTileRows * kBStride;   // 16 lines = 32 K

  AmxOperands(const Problem& p, const TileConfig& config)
      : x(static_cast<const uint8_t*>(p.x)),
        tile_bytes(p.steps * kUnits * kStepBytes),
        a_stride(p.x_stride * static_cast<int64_t>(sizeof(c10::BFloat16))),
        k_blocks(p.k / kAmxKBlock) {
    _tile_loadconfig(&config);
  }
  ~AmxOperands() { _tile_release(); }

  const uint8_t* x;
  int64_t tile_bytes, a_stride, k_blocks;
};

// Both kernels accumulate C in tmm0..3.
MG_ALWAYS_INLINE void zero_accumulator_tiles() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// Hands a kernel's sums ([output set][row][16]) to the epilogue of its op, for x and out of type T.
template <typename T, int kUnits>
MG_ALWAYS_INLINE void store_sums(const Problem& p, const int64_t* ids, int tiles, int64_t row0, int64_t rows,
                                 const float* sums) {
  if constexpr (kUnits == 2) {
    store_silu_mul<T>(p, ids, tiles, row0, rows, sums);
  } else {
    store_linear<T>(p, ids, tiles, row0, rows, sums);
  }
}

// Items are pairs of tiles (linear) or single gate_up tiles; either way 32 outputs' worth of B.
template <int kUnits>
void amx_tiles(const Problem& p, int64_t begin, int64_t end) {
  using O = AmxOperands<kUnits>;
  static constexpr TileConfig kConfig = full_tiles();
  const O o(p, kConfig);
  alignas(64) float sums[2 * kAmxRowBlock * kTileRows];
  constexpr int64_t kTilesPerItem = kUnits == 1 ? 2 : 1;
  for (int64_t t = begin; t < end; t += kTilesPerItem) {
    const int tiles = static_cast<int>(std::min(kTilesPerItem, end - t));
    const uint8_t* b0 = p.tiles + t * o.tile_bytes;
    // The second output set: up rows (silu_mul), the next tile, or a repeat whose sums are dropped.
    const uint8_t* b1 = kUnits == 2 ? b0 + kStepBytes : (tiles == 2 ? b0 + o.tile_bytes : b0);
    const int64_t ids[2] = {t, t + 1};
    for (int64_t row0 = 0; row0 < p.rows; row0 += kAmxRowBlock) {
      const uint8_t* a = o.x + row0 * o.a_stride;
      zero_accumulator_tiles();
      for (int64_t kb = 0; kb < o.k_blocks; ++kb) {
        _tile_loadd(4, a + kb * 64, o.a_stride);
        _tile_loadd(5, a + 16 * o.a_stride + kb * 64, o.a_stride);
        _tile_loadd(6, b0 + kb * O::kBBlock, O::kBStride);
        _tile_loadd(7, b1 + kb * O::kBBlock, O::kBStride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      // The epilogues' layout: [output set][row][16], `rows` rows per set.
      const int64_t rows = std::min(kAmxRowBlock, p.rows - row0);
      _tile_stored(0, sums, 64);
      _tile_stored(2, sums + 16 * kTileRows, 64);
      _tile_stored(1, sums + rows * kTileRows, 64);
      if (rows > 16) _tile_stored(3, sums + (rows + 16) * kTileRows, 64);
      store_sums<c10::BFloat16, kUnits>(p, ids, tiles, row0, rows, sums);  // a gate_up item is one tile
    }
  }
}

// Batches of at most 16 rows (decode steps): one A tile against four output sets (four tiles for
// linear; gate and up of two tiles for silu_mul). The 2 x 2 blocking above would spend half its
// TDPBF16PS on the zero rows of a 32-row block and stream one item at a time; here every product
// is useful and four B streams are in flight. Each k-block prefetches the B tiles two blocks ahead
// in every stream: the tile loads queue behind the weight stream, so the lines must already be
// coming. The C and A tiles are as high as the batch, so a one-row decode multiplies one row, not 16.
// tmm0..3: C, tmm4: A (rows high), tmm5..7: B, tmm5 reused for the fourth set once its product is issued.
template <int kUnits>
void amx_tiles_16(const Problem& p, int64_t begin, int64_t end) {
  using O = AmxOperands<kUnits>;
  constexpr int64_t kPrefetchBlocks = 2;
  const TileConfig config = cpu::short_tiles(5, static_cast<int>(p.rows));
  const O o(p, config);
  alignas(64) float sums[4 * kTileRows * kTileRows];
  constexpr int64_t kTilesPerItem = kUnits == 1 ? 4 : 2;
  for (int64_t t = begin; t < end; t += kTilesPerItem) {
    const int tiles = static_cast<int>(std::min(kTilesPerItem, end - t));
    // Output set i: tile t + i (linear) or sub-tile i % 2 of tile t + i / 2 (silu_mul); sets past
    // the range repeat tile t and their sums are dropped.
    const uint8_t* b[4];
    for (int i = 0; i < 4; ++i) {
      const int tile = kUnits == 1 ? i : i / 2;
      b[i] = p.tiles + (t + (tile < tiles ? tile : 0)) * o.tile_bytes + (kUnits == 2 ? (i % 2) * kStepBytes : 0);
    }
    zero_accumulator_tiles();
    for (int64_t kb = 0; kb < o.k_blocks; ++kb) {
      const int64_t offset = kb * O::kBBlock;
      for (int i = 0; i < 4; ++i) {
        for (int64_t line = 0; line < O::kBBlock; line += kStepBytes) {
          __builtin_prefetch(b[i] + offset + kPrefetchBlocks * O::kBBlock + line, 0, 3);
        }
      }
      _tile_loadd(4, o.x + kb * 64, o.a_stride);
      _tile_loadd(5, b[0] + offset, O::kBStride);
      _tile_loadd(6, b[1] + offset, O::kBStride);
      _tile_loadd(7, b[2] + offset, O::kBStride);
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(1, 4, 6);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, b[3] + offset, O::kBStride);
      _tile_dpbf16ps(3, 4, 5);
    }
    // The epilogues' layout: [output set][row][16], `rows` rows per set; each store's rows past
    // `rows` land where the next store (or the buffer's spare end) overwrites them.
    const int64_t rows = p.rows;
    _tile_stored(0, sums, 64);
    _tile_stored(1, sums + rows * kTileRows, 64);
    _tile_stored(2, sums + 2 * rows * kTileRows, 64);
    _tile_stored(3, sums + 3 * rows * kTileRows, 64);
    const int64_t ids[4] = {t, t + 1, t + 2, t + 3};
    store_sums<c10::BFloat16, kUnits>(p, ids, tiles, 0, rows, sums);
  }
}

// ---- fp32 ------------------------------------------------------------------------------------
// fp32 batches on AMX. Every fp32 value v splits exactly into three bf16 parts, v = v0 + v1 + v2:
// v0 is v with its low 16 bits cleared (the top 8 significant bits), v1 the same of v - v0, v2 what
// is left (at most 8 bits); each subtraction is exact. x . w then sums the six products of parts
// whose orders add to at most 2 (x0w0, x0w1, x1w0, x0w2, x1w1, x2w0): the three left out add up to
// less than 2^-20 of their product. TDPBF16PS multiplies bf16 pairs exactly and adds in fp32, and
// fp32 accumulation over K loses more than that: against an fp64 reference ([256, 1024] and
// [256, 3584], 64 rows, Gaussian data) half the error of the FMA kernels (mean 2.3e-7 vs 5.0e-7 of
// |y|). Inputs that are denormal, infinite or NaN go their own way (TDPBF16PS flushes denormals,
// inf - inf is NaN); model activations and weights are none of these.

MG_ALWAYS_INLINE void split3(__m512i v, __m512i& p0, __m512i& p1, __m512i& p2) {
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  p0 = _mm512_and_si512(v, top);
  const __m512 rest = _mm512_sub_ps(_mm512_castsi512_ps(v), _mm512_castsi512_ps(p0));
  p1 = _mm512_and_si512(_mm512_castps_si512(rest), top);
  p2 = _mm512_castps_si512(_mm512_sub_ps(rest, _mm512_castsi512_ps(p1)));
}

}  // namespace

// x's parts: chunk c of K, row block b (16 rows), 32-K block j of the chunk, part i, row r, then
// the block's 32 K as bf16 bits ([c][b][j][i][r][32]), so each A tile (one part of 16 rows, 32 K)
// is 1 KiB in one piece, and one row block's pass over the chunk reads a 12 KiB run in order (a
// strided read of A tiles is slower). Written chunk by chunk, 64 bytes of a part at a time (two
// vectors packed by one vcvtne2ps2bf16, exact since every part is a bf16 value): whole-line stores.
void split_fp32_rows(const float* x, int64_t x_stride, int64_t rows, int64_t k, int64_t begin, int64_t end,
                     uint16_t* parts) {
  constexpr int64_t kChunkK = kAmxFp32ChunkBlocks * kAmxKBlock;
  const int64_t row_blocks = tiles_for(rows);
  for (int64_t j0 = 0; j0 < k; j0 += kChunkK) {
    uint16_t* chunk = parts + j0 / kChunkK * row_blocks * 3 * kTileRows * kChunkK;
    const int64_t width = std::min(kChunkK, k - j0);
    for (int64_t m = begin; m < end; ++m) {
      uint16_t* row = chunk + (m / kTileRows) * 3 * kTileRows * kChunkK + (m % kTileRows) * kAmxKBlock;
      for (int64_t j = 0; j < width; j += 32) {
        __m512i low[3], high[3];
        const float* src = x + m * x_stride + j0 + j;
        split3(m < rows ? _mm512_loadu_si512(src) : _mm512_setzero_si512(), low[0], low[1], low[2]);
        split3(m < rows ? _mm512_loadu_si512(src + 16) : _mm512_setzero_si512(), high[0], high[1], high[2]);
        for (int i = 0; i < 3; ++i) {
          const __m512bh packed = _mm512_cvtne2ps_pbh(_mm512_castsi512_ps(high[i]), _mm512_castsi512_ps(low[i]));
          uint16_t* tile_row = row + (j / kAmxKBlock * 3 + i) * kTileRows * kAmxKBlock;
          _mm512_storeu_si512(tile_row, reinterpret_cast<const __m512i&>(packed));
        }
      }
    }
  }
}

namespace {

// The three VNNI B tiles (16 K pairs x 16 outputs, 1 KiB each, at out, out + 1 KiB, out + 2 KiB) of
// the 32 fp32 weight lines from `lines` on, `stride` bytes apart.
MG_ALWAYS_INLINE void split_weights(const uint8_t* lines, int64_t stride, uint8_t* out) {
#pragma GCC unroll 4
  for (int pair = 0; pair < kTileRows; ++pair) {
    const uint8_t* even = lines + 2 * pair * stride;
    __m512i e[3], o[3];
    split3(_mm512_loadu_si512(even), e[0], e[1], e[2]);
    split3(_mm512_loadu_si512(even + stride), o[0], o[1], o[2]);
    for (int i = 0; i < 3; ++i) {
      // dword j = (w[j, 2 pair] in the low half, w[j, 2 pair + 1] in the high half), as VNNI pairs them.
      // (maskz: the plain _mm512_srli_epi32 trips a false -Wmaybe-uninitialized in GCC 12)
      _mm512_store_si512(out + i * 1024 + pair * 64, _mm512_or_si512(o[i], _mm512_maskz_srli_epi32(0xffff, e[i], 16)));
    }
  }
}

// A set's three weight parts at b (three contiguous 1 KiB B tiles) into tmm5..7.
MG_ALWAYS_INLINE void load_weight_parts(const uint8_t* b) {
  _tile_loadd(5, b, 64);
  _tile_loadd(6, b + 1024, 64);
  _tile_loadd(7, b + 2048, 64);
}

// `bytes` from p on into L1, a line at a time.
MG_ALWAYS_INLINE void prefetch_l1(const uint8_t* p, int64_t bytes) {
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset, 0, 3);
}

// C tile c += the six products of x's parts (tmm2..4) and the weight's parts (tmm5..7).
#define MG_SIX_PRODUCTS(c)        \
  _tile_dpbf16ps(c, 2, 5);        \
  _tile_dpbf16ps(c, 2, 6);        \
  _tile_dpbf16ps(c, 3, 5);        \
  _tile_dpbf16ps(c, 2, 7);        \
  _tile_dpbf16ps(c, 3, 6);        \
  _tile_dpbf16ps(c, 4, 5)

// The most bytes of C a group of items carries from chunk to chunk (2 KiB per item and row block):
// a quarter of a core's L2, beside the chunk of x's parts that every item of the group re-reads
// (more pushes the parts out of L2).
constexpr int64_t kFp32CarryBytes = 512 << 10;

constexpr int64_t kSplitBytes = 3 * 1024;                             // a set's three B tiles for 32 K
constexpr int64_t kPartBytes = kTileRows * kAmxFp32ChunkBlocks * 64;  // a part of 16 rows over a chunk
constexpr int64_t kATilesBytes = 3 * 1024;                            // a row block's three A tiles for 32 K

// An item's weights for K blocks [kb0, kb1), split into `split`: per block, the first output set's
// three B tiles, then the second's.
MG_ALWAYS_INLINE void split_item_weights(const uint8_t* b0, const uint8_t* b1, int64_t kb0, int64_t kb1,
                                         int64_t block_bytes, int64_t line_stride, uint8_t* split) {
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    split_weights(b0 + kb * block_bytes, line_stride, split + 2 * (kb - kb0) * kSplitBytes);
    split_weights(b1 + kb * block_bytes, line_stride, split + (2 * (kb - kb0) + 1) * kSplitBytes);
  }
}

// The (item, chunk) after `item` at chunk [kb0, kb1) in amx_fp32_tiles' loops: the group's next
// item, else the group's first item at the next chunk, else past the group (g1) at the first chunk.
MG_ALWAYS_INLINE std::pair<int64_t, int64_t> next_item_chunk(int64_t item, int64_t g0, int64_t g1, int64_t kb0,
                                                             int64_t kb1, int64_t kb_begin, int64_t kb_end) {
  int64_t next_item = item + 1, next_kb = kb0;
  if (next_item == g1) {
    next_item = kb1 == kb_end ? g1 : g0;
    next_kb = kb1 == kb_end ? kb_begin : kb1;
  }
  return {next_item, next_kb};
}

// What the next (item, chunk) splits, spread over this one's steps: its sets' lines for the chunk
// (linear: two regions, one per tile, a tile's `steps` lines apart; gate_up: one, the sets
// interleave), a share asked for at each step.
template <int kUnits>
struct NextWeightsPrefetch {
  // `first_line`: the first region's first line (none: null, and no lines); `steps`: the current
  // (item, chunk)'s steps, row blocks times K blocks.
  NextWeightsPrefetch(const uint8_t* first_line, int64_t lines_per_region, int64_t steps, int64_t lines_per_tile)
      : next(first_line),
        region_lines(lines_per_region),
        next_lines((kUnits == 1 ? 2 : 1) * lines_per_region),
        per_step((next_lines + steps - 1) / steps),
        tile_steps(lines_per_tile) {}

  MG_ALWAYS_INLINE void some() {
    for (const int64_t stop = std::min(next_lines, next_line + per_step); next_line < stop; ++next_line) {
      const int64_t line = next_line < region_lines ? next_line : next_line - region_lines + tile_steps;
      __builtin_prefetch(next + line * kStepBytes, 0, 3);
    }
  }

  const uint8_t* next;
  int64_t region_lines, next_lines, per_step, tile_steps;
  int64_t next_line = 0;  // lines asked for so far
};

// A row block's C (tmm0, tmm1) at the start of a chunk: zero at K's first chunk, else as carried.
MG_ALWAYS_INLINE void load_carry(const float* c, bool first_chunk) {
  if (first_chunk) {
    _tile_zero(0);
    _tile_zero(1);
  } else {
    _tile_loadd(0, c, 64);
    _tile_loadd(1, c + kTileRows * kTileRows, 64);
  }
}

MG_ALWAYS_INLINE void store_carry(float* c) {
  _tile_stored(0, c, 64);
  _tile_stored(1, c + kTileRows * kTileRows, 64);
}

// C += row block rb's parts of x for K blocks [kb0, kb1) (in x_chunk) times the split weights of
// both output sets. Each step also prefetches the next 32 K's A tiles (the next step's, or the next
// row block's first) from L2, where the chunk of x's parts lives, into L1: an A tile load from L2
// holds up the tile unit for its whole latency, one from L1 does not. A tile load also waits for
// the loads issued before it, prefetches included, so the prefetches go right after a set's B tile
// loads, where six products follow before the next tile load.
template <int kUnits>
MG_ALWAYS_INLINE void multiply_chunk(const uint8_t* x_chunk, int64_t rb, int64_t kb0, int64_t kb1,
                                     const uint8_t* split, NextWeightsPrefetch<kUnits>& next_weights) {
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const uint8_t* a = x_chunk + rb * 3 * kPartBytes + (kb - kb0) * kATilesBytes;
    _tile_loadd(2, a, 64);
    _tile_loadd(3, a + 1024, 64);
    _tile_loadd(4, a + 2048, 64);
    load_weight_parts(split + 2 * (kb - kb0) * kSplitBytes);
    prefetch_l1(a + kATilesBytes, kATilesBytes / 2);
    next_weights.some();
    MG_SIX_PRODUCTS(0);
    load_weight_parts(split + (2 * (kb - kb0) + 1) * kSplitBytes);
    prefetch_l1(a + kATilesBytes + kATilesBytes / 2, kATilesBytes / 2);
    MG_SIX_PRODUCTS(1);
  }
}

// Row block rb's outputs from its final C, through the op's epilogue: ids t and t + 1, `tiles` of them.
template <int kUnits>
MG_ALWAYS_INLINE void store_outputs(const Problem& p, int64_t t, int tiles, int64_t rb, float* sums) {
  const int64_t row0 = rb * kTileRows, rows = std::min(kTileRows, p.rows - row0);
  _tile_stored(0, sums, 64);
  _tile_stored(1, sums + rows * kTileRows, 64);  // its rows past `rows` land in the spare end
  const int64_t ids[2] = {t, t + 1};
  store_sums<float, kUnits>(p, ids, tiles, row0, rows, sums);
}

// Items are pairs of tiles (linear) or single gate_up tiles: two output sets, C in tmm0 and tmm1.
// Loops: groups of items, chunks of K, the group's items, row blocks. A chunk of x's parts (all
// rows, 768 bytes a row) stays in L2 while the group's items run against it; each item's weights
// for the chunk are split once into a 24 KiB buffer that stays in L1 while the row blocks run; C
// is carried from chunk to chunk per item and row block; and the next (item, chunk)'s weights are
// prefetched while the row blocks compute. So the weights stream once per call, x's parts come
// from L2 (prefetched into L1 a step ahead) and the split weights from L1. A call may cover a segment of K only
// (Problem::k_begin, k_end; run_tiles): C then comes from and goes to the caller's carry.
template <int kUnits>
void amx_fp32_tiles(const Problem& p, int64_t begin, int64_t end) {
  constexpr int64_t kTilesPerItem = amx_fp32_tiles_per_item(kUnits);
  constexpr int64_t kChunk = kAmxFp32ChunkBlocks;
  constexpr int64_t kCarryFloats = kAmxFp32CarryFloats;           // both sets' C
  const int64_t k_blocks = p.k / kAmxKBlock, line_stride = kUnits * kStepBytes;
  const int64_t kb_begin = p.k_begin / kAmxKBlock, kb_end = p.k_end / kAmxKBlock;
  const int64_t tile_bytes = p.steps * line_stride, block_bytes = kAmxKBlock * line_stride;
  const int64_t row_blocks = tiles_for(p.rows);
  const int64_t items = (end - begin + kTilesPerItem - 1) / kTilesPerItem;
  const int64_t group_items =
      std::clamp<int64_t>(kFp32CarryBytes / (row_blocks * kCarryFloats * sizeof(float)), 1, items);
  const auto* parts = static_cast<const uint8_t*>(p.x);
  thread_local std::vector<float> carry_storage;
  float* carry = line_aligned(carry_storage, p.carry ? 0 : group_items * row_blocks * kCarryFloats);
  // C of (item, row block): in this call's own slots, or in the caller's when K takes several calls
  // (`begin` is then a whole number of items).
  const auto carried = [&](int64_t item, int64_t g0, int64_t rb) {
    return p.carry ? p.carry + ((begin / kTilesPerItem + item) * row_blocks + rb) * kCarryFloats
                   : carry + ((item - g0) * row_blocks + rb) * kCarryFloats;
  };
  alignas(64) uint8_t split[kChunk * 2 * kSplitBytes];
  alignas(64) float sums[kCarryFloats];
  // Item i's two output sets: its tile (or gate rows) and the next tile (or up rows, or a repeat
  // of its tile whose sums are dropped).
  const auto sets = [&](int64_t item) {
    const int64_t t = begin + item * kTilesPerItem;
    const uint8_t* b0 = p.tiles + t * tile_bytes;
    return std::pair{b0, kUnits == 2 ? b0 + kStepBytes : (t + 1 < end ? b0 + tile_bytes : b0)};
  };
  static constexpr TileConfig kConfig = full_tiles();
  _tile_loadconfig(&kConfig);
  for (int64_t g0 = 0; g0 < items; g0 += group_items) {
    const int64_t g1 = std::min(items, g0 + group_items);
    for (int64_t kb0 = kb_begin; kb0 < kb_end; kb0 += kChunk) {
      const int64_t kb1 = std::min(kb_end, kb0 + kChunk);
      const bool last = kb1 == k_blocks;
      const uint8_t* x_chunk = parts + (kb0 - kb_begin) / kChunk * row_blocks * 3 * kPartBytes;
      for (int64_t item = g0; item < g1; ++item) {
        const auto [b0, b1] = sets(item);
        split_item_weights(b0, b1, kb0, kb1, block_bytes, line_stride, split);
        const auto [next_item, next_kb] = next_item_chunk(item, g0, g1, kb0, kb1, kb_begin, kb_end);
        const bool more = next_item < items;
        NextWeightsPrefetch<kUnits> next_weights(
            more ? sets(next_item).first + next_kb * block_bytes : nullptr,
            more ? std::min(kChunk, k_blocks - next_kb) * block_bytes / kStepBytes : 0, row_blocks * (kb1 - kb0),
            p.steps);
        const int64_t t = begin + item * kTilesPerItem;
        const int tiles = static_cast<int>(std::min(kTilesPerItem, end - t));
        for (int64_t rb = 0; rb < row_blocks; ++rb) {
          float* c = carried(item, g0, rb);
          load_carry(c, kb0 == 0);
          multiply_chunk(x_chunk, rb, kb0, kb1, split, next_weights);
          if (last) {
            store_outputs<kUnits>(p, t, tiles, rb, sums);
          } else {
            store_carry(c);
          }
        }
      }
    }
  }
  _tile_release();
}
#undef MG_SIX_PRODUCTS

#pragma GCC pop_options

}  // namespace

bool amx_usable() {
  static const bool usable = request_amx();
  return usable;
}

const KernelSet kAmxBf16{.linear = &amx_tiles<1>, .silu_mul = &amx_tiles<2>, .read_lines = nullptr};
const KernelSet kAmxBf16Rows16{.linear = &amx_tiles_16<1>, .silu_mul = &amx_tiles_16<2>, .read_lines = nullptr};
const KernelSet kAmxFp32{.linear = &amx_fp32_tiles<1>, .silu_mul = &amx_fp32_tiles<2>, .read_lines = nullptr};

}  // namespace mistral_grpc::linear

#endif  // MG_LINEAR_X86_KERNELS
