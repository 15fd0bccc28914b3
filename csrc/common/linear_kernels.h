// What the CPU linear ops (cpu/linear.cpp) call and what each ISA's translation unit
// (cpu/linear_{portable,avx2,avx512}.cpp) provides: one KernelSet per (ISA, weight dtype).
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

#include "common/linear_pack.h"

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
  int64_t steps;         // 64-byte lines per tile
  int64_t k;             // logical input features
  const void* x;         // [rows, k], rows x_stride elements apart; fp32 or bf16 as the weight
  int64_t x_stride;
  void* out;             // [rows, n] in x's dtype, rows out_stride elements apart
  int64_t out_stride;
  int64_t rows;          // T
  int64_t n;             // valid outputs: N (linear) or F (silu_mul)
};

// Computes the outputs of tiles [begin, end) for all rows: for `linear` a tile is 16 outputs,
// for `silu_mul` a tile index is one gate tile plus its up tile (16 outputs of silu(g) * u).
using TileRangeFn = void (*)(const Problem&, int64_t begin, int64_t end);
// Streams `lines` 64-byte lines with the kernels' own load loop; returns a value to keep it alive.
using ReadLinesFn = float (*)(const uint8_t* data, int64_t lines);

struct KernelSet {
  const char* isa;
  TileRangeFn linear;
  TileRangeFn silu_mul;
  ReadLinesFn read_lines;
};

extern const KernelSet kPortableFp32;
extern const KernelSet kPortableBf16;
#if MG_LINEAR_X86_KERNELS
extern const KernelSet kAvx2Fp32;
extern const KernelSet kAvx2Bf16;
extern const KernelSet kAvx512Fp32;
extern const KernelSet kAvx512Bf16;         // bf16 widened with shifts, fp32 FMA (AVX-512F only)
extern const KernelSet kAvx512Bf16Dot;      // vdpbf16ps on the packed pairs (AVX512_BF16)
#endif

// How far ahead of the line being multiplied the kernels prefetch. Each thread streams one
// contiguous run, which the hardware prefetcher follows too; the software prefetch keeps a few
// more lines in flight and crosses the page boundaries where the hardware one stops.
constexpr int64_t kPrefetchBytes = 16 * kStepBytes;

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

}  // namespace mistral_grpc::linear
