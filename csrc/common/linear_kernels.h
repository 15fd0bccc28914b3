// What the CPU linear ops (cpu/linear.cpp) call and what each ISA's translation unit
// (cpu/linear_{portable,avx2,avx512,amx}.cpp) provides: one KernelSet per (ISA, weight dtype).
//
// The build is baseline x86-64 so the binary runs anywhere. Each ISA file compiles the same kernel
// body (common/linear_kernel_body.h) inside a `#pragma GCC target` region and its own namespace,
// and cpu/linear.cpp picks the best set the CPU supports once, at first use. Only GCC gets the
// x86 sets (the pragma is GCC's); any other compiler or CPU runs the portable set.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "common/activation.h"
#include "common/linear_pack.h"
#include "cpu/simd.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MG_LINEAR_X86_KERNELS 1
#include <immintrin.h>
#else
#define MG_LINEAR_X86_KERNELS 0
#endif

namespace mistral_grpc::linear {

// One call's operands, shared by every tile range the threads split it into.
struct Problem {
  const uint8_t* tiles;  // tile 0 (just past the header)
  int64_t steps;         // 64-byte lines per 16-row sub-tile
  int64_t k;             // logical input features
  const void* x;         // [rows, k], rows x_stride elements apart; fp32 or bf16 as the weight
  int64_t x_stride;
  void* out;             // [rows, n] in x's dtype, rows out_stride elements apart
  int64_t out_stride;
  int64_t rows;          // T
  int64_t n;             // valid outputs: N (linear) or F (silu_mul)
  // fp32 on AMX only (kAmxFp32): the call folds K [k_begin, k_end) into the sums, x holding the
  // parts of just those columns. When K takes several calls, C goes from one to the next through
  // `carry` (kAmxFp32CarryFloats per item and row block, items in order); the first call starts
  // from zero and the last one stores the outputs. Null: one call covers K.
  int64_t k_begin = 0, k_end = 0;
  float* carry = nullptr;
};

// Computes the outputs of tiles [begin, end) for all rows: 16 outputs per tile (for `silu_mul`,
// silu(gate) * up of the tile's 16 gate and 16 up rows).
using TileRangeFn = void (*)(const Problem&, int64_t begin, int64_t end);
// Streams `lines` 64-byte lines with the kernels' own load loop; returns a value to keep it alive.
using ReadLinesFn = float (*)(const uint8_t* data, int64_t lines);

struct KernelSet {
  TileRangeFn linear;
  TileRangeFn silu_mul;
  ReadLinesFn read_lines;
};

// The set of the level linear_cpu_isa has in use, for a weight dtype (cpu/linear.cpp).
const KernelSet& kernels_for(WeightDtype dtype);

// A thread's share of a call should stream at least this much, or waking the second thread costs
// more than it saves (tiny matrices, tests).
constexpr int64_t kMinBytesPerThread = 128 * 1024;

extern const KernelSet kPortableFp32;
extern const KernelSet kPortableBf16;
#if MG_LINEAR_X86_KERNELS
extern const KernelSet kAvx2Fp32;
extern const KernelSet kAvx2Bf16;
extern const KernelSet kAvx512Fp32;
extern const KernelSet kAvx512Bf16;         // bf16 widened with shifts, fp32 FMA (AVX-512F only)
extern const KernelSet kAvx512Bf16Dot;      // vdpbf16ps on the packed pairs (AVX512_BF16)
// AMX for bf16 batches (prefill): the packed bf16 tile is already the VNNI layout of an AMX B tile.
// Needs K % 32 == 0 and x with its rows padded to a multiple of kAmxRowBlock, zeros past T.
extern const KernelSet kAmxBf16;
extern const KernelSet kAmxBf16Rows16;  // batches of at most 16 rows, x padded to 16
constexpr int64_t kAmxRowBlock = 32;
constexpr int64_t kAmxSmallRows = 16;
constexpr int64_t kAmxKBlock = 32;
// AMX for fp32 batches (prefill), as accurate as the FMA kernels: x and the weights split exactly
// into three bf16 parts each (cpu/linear_amx.cpp). x goes in as its parts, laid out by
// split_fp32_rows; needs K % 32 == 0.
extern const KernelSet kAmxFp32;
constexpr int64_t kAmxFp32ChunkBlocks = 4;  // 32-K blocks per chunk of K
constexpr int64_t kAmxFp32CarryFloats = 2 * kTileRows * kTileRows;  // an item's C for 16 rows, both sets
// Tiles per item (two output sets): a pair for linear, one tile's gate and up for silu_mul. The
// caller splits the tiles by whole items, which the carry's indexing relies on.
constexpr int64_t amx_fp32_tiles_per_item(int units) { return units == 1 ? 2 : 1; }
// bf16 elements split_fp32_rows lays out for `rows` rows of K: rows padded to 16, K to whole chunks.
constexpr int64_t fp32_parts_elems(int64_t rows, int64_t k) {
  const int64_t chunks = (k / kAmxKBlock + kAmxFp32ChunkBlocks - 1) / kAmxFp32ChunkBlocks;
  return chunks * tiles_for(rows) * 3 * kTileRows * kAmxFp32ChunkBlocks * kAmxKBlock;
}
// Rows [begin, end) of x's three parts (rows at or past `rows` as zeros, up to rows padded to 16).
void split_fp32_rows(const float* x, int64_t x_stride, int64_t rows, int64_t k, int64_t begin, int64_t end,
                     uint16_t* parts);
// `count` elements of `storage` (a thread's scratch, kept between calls) from a 64-byte boundary,
// which std::vector's own storage is not: every AMX tile row is then one cache line (x's parts
// 16-byte aligned made each A row span two lines, 8 layers' linears 224-241 -> 267-288 ms).
template <typename T>
T* line_aligned(std::vector<T>& storage, int64_t count) {
  constexpr int64_t kLine = 64;
  storage.resize(count + kLine / sizeof(T));
  return storage.data() + (-reinterpret_cast<uintptr_t>(storage.data()) % kLine) / sizeof(T);
}
// Whether the CPU has AMX-BF16 and the OS lets this process use the tile registers (asked once).
bool amx_usable();
#endif

// How far ahead of the line being multiplied the kernels prefetch, in each stream. The hardware
// prefetcher follows the streams too; the software prefetch keeps a few more lines in flight and
// crosses the 4 KiB page boundaries where the hardware one stops (+3% on one core here). 32 lines
// ahead rather than 16: the linear weights of a fp32 batch-1 decode step, back to back, 17.6-18.1 ->
// 17.1-17.3 ms (qkv 30 -> 31 GB/s, lm_head 29-32 -> 33); the read loop measures the same either way.
constexpr int64_t kPrefetchBytes = 32 * kStepBytes;

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The activation side of a step, by weight dtype; each ISA adds the vector half (Acc, step).
// fp32: a step is one K column, multiplied by x[s].
struct Fp32Operands {
  using Elem = float;
  using XVal = float;
  static constexpr int64_t kKPerStep = 1;
  static XVal x_at(const Elem* row, int64_t s) { return row[s]; }
  static XVal x_partial(const Elem* row, int64_t s) { return row[s]; }
};

// bf16: a step is two K columns, multiplied by the pair (x[2s], x[2s+1]) read as one 32-bit word
// (x[2s] in the low half, as vdpbf16ps pairs it). When K is odd the last pair is (x[K-1], 0):
// the weight there is a zero pad, but x[K] is not ours to read and could be a NaN.
struct Bf16Operands {
  using Elem = c10::BFloat16;
  using XVal = uint32_t;
  static constexpr int64_t kKPerStep = 2;
  static XVal x_at(const Elem* row, int64_t s) {
    uint32_t pair;
    std::memcpy(&pair, row + 2 * s, sizeof pair);
    return pair;
  }
  static XVal x_partial(const Elem* row, int64_t s) { return row[2 * s].x; }
  static float low(XVal pair) { return bits_to_float(pair << 16); }
  static float high(XVal pair) { return bits_to_float(pair & 0xffff0000u); }
};

// The epilogues, shared by every kernel: sums[(g * units + u) * rows + m][16] holds row m's dot
// products with sub-tile u of tile ids[g] (units = 1 for linear, 2 = gate, up for silu_mul).
// Both work in vectors and are inlined into each ISA's kernel, so they are as wide as its vectors:
// scalar loops here were a fifth of an AMX linear (bf16 [7168, 1024] at 512 rows: 4.56 -> 3.73 ms)
// and a seventh of a 512-token fp32 prefill's gate_up (libm exp).
template <typename Elem>
MG_ALWAYS_INLINE void store_linear(const Problem& p, const int64_t* ids, int tiles, int64_t row0, int64_t rows,
                                   const float* sums) {
  auto* out = static_cast<Elem*>(p.out);
  for (int g = 0; g < tiles; ++g) {
    const int64_t n0 = ids[g] * kTileRows;
    const int64_t width = std::min(kTileRows, p.n - n0);
    for (int64_t m = 0; m < rows; ++m) {
      cpu::store_n(out + (row0 + m) * p.out_stride + n0, cpu::load(sums + (g * rows + m) * kTileRows), width);
    }
  }
}

// gate and up are rounded to the output dtype first, as F.linear would return them, then go through
// silu_and_mul's own math, so the fused op equals linear followed by silu_and_mul.
template <typename Elem>
MG_ALWAYS_INLINE void store_silu_mul(const Problem& p, const int64_t* ids, int tiles, int64_t row0, int64_t rows,
                                     const float* sums) {
  static_assert(kTileRows == cpu::kLanes);
  auto* out = static_cast<Elem*>(p.out);
  const cpu::RoundTo<Elem> round;
  for (int g = 0; g < tiles; ++g) {
    const int64_t f0 = ids[g] * kTileRows;
    const int64_t width = std::min(kTileRows, p.n - f0);
    for (int64_t m = 0; m < rows; ++m) {
      const cpu::vfloat gate = round(cpu::load(sums + ((2 * g) * rows + m) * kTileRows));
      const cpu::vfloat up = round(cpu::load(sums + ((2 * g + 1) * rows + m) * kTileRows));
      cpu::store_n(out + (row0 + m) * p.out_stride + f0, silu_and_mul(gate, up, cpu::Exp{}, round), width);
    }
  }
}

}  // namespace mistral_grpc::linear
