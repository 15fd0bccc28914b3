// The arithmetic of the CUDA quantized linear kernels (cuda/linear_quant.cu), host-device so that the CPU
// runs it too (cpu/quant_cuda_math.cpp: the ops cuda_quant_math_*, for tests without a GPU). Weight-only:
// x stays in its float dtype (float32, bfloat16 or float16); each weight is dequantized exactly as
// (q - zero) * scale (common/quant.h) and multiplied with x in fp32.
//
// Decode (at most kGemvMaxRows rows of x): one thread block of kGemvThreads per 16-row tile streams the
// tile once. A q line (64 bytes: one 4-byte word per row) is read as four 16-byte quarters, quarter c
// holding rows 4c..4c+3. Thread t takes quarter t % 4 of the tile's q lines t / 4, t / 4 + kLineSlots, ...
// in K order (for gate_up: the same line of both units), so a warp reads 8 consecutive whole lines per
// step, kLinesInFlight steps' loads issued before their multiplies; each thread keeps fp32 sums for its
// 4 rows and every x row, then the block adds the threads up.
// Prefill (more rows): the pack is dequantized into a dense [units * N, K] matrix in x's dtype (quarter by
// quarter, the same unpacking) and cuBLAS multiplies it.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/activation.h"
#include "common/host_device.h"
#include "common/linear_pack.h"
#include "common/quant.h"

namespace mistral_grpc::quant {

constexpr int kQuarters = 4;                                          // 16-byte quarters per q line
constexpr int kQuarterRows = static_cast<int>(kTileRows) / kQuarters;  // rows per quarter
constexpr int kGemvThreads = 128;                                     // threads per tile
constexpr int kLineSlots = kGemvThreads / kQuarters;                  // q lines a block reads per step
// The most x rows one GEMV pass serves. Its fp32 multiply-adds grow with the rows while the weight
// stream does not: past 8 rows dequantizing once and a cuBLAS GEMM (tensor cores) cost less.
constexpr int kGemvMaxRows = 8;

// K values one row's 4-byte word holds in a q line.
template <int Bits>
constexpr int kWordValues = Bits == 8 ? 4 : 8;

struct alignas(16) Quarter {
  uint32_t word[kQuarterRows];
};

C10_HOST_DEVICE inline Quarter load_quarter(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const Quarter*>(p);  // one 16-byte load (packs are 16-byte aligned)
#else
  Quarter quarter;
  std::memcpy(&quarter, p, sizeof quarter);
  return quarter;
#endif
}

// One row's values in one q line, in K order: int8 bytes 0..3; int4 the low nibbles of bytes 0..3, then
// their high nibbles (the layout q_at reads).
template <int Bits>
C10_HOST_DEVICE inline void unpack_word(uint32_t word, int (&q)[kWordValues<Bits>]) {
  MG_UNROLL
  for (int i = 0; i < 4; ++i) {
    const int byte = static_cast<int>((word >> (8 * i)) & 0xffu);
    if constexpr (Bits == 8) {
      q[i] = byte;
    } else {
      q[i] = byte & 0xf;
      q[4 + i] = byte >> 4;
    }
  }
}

// The header's activation code for x's dtype T.
template <typename T>
C10_HOST_DEVICE constexpr linear::WeightDtype activation_of() {
  if constexpr (std::is_same_v<T, float>) return linear::WeightDtype::kFloat32;
  if constexpr (std::is_same_v<T, c10::BFloat16>) return linear::WeightDtype::kBFloat16;
  return linear::WeightDtype::kFloat16;
}

// Whether `header` is that of a quantized pack of `bytes` bytes for `kind` which multiplies x [*, k] of
// dtype `activation` into out [*, n]: what the kernels check on the device, where the host cannot read it.
C10_HOST_DEVICE constexpr bool header_matches(const linear::PackedHeader& header, linear::PackKind kind, int64_t n,
                                              int64_t k, linear::WeightDtype activation, int64_t bytes) {
  return header.magic == linear::kPackedMagic && header.kind == kind && header.n == n && header.k == k &&
         header.activation == activation && n > 0 && k > 0 && scheme_valid(header) && packed_bytes(header) == bytes;
}

// Whether `bytes` is the size of some quantized pack (int8, or int4 in any group size) of `units` [n, k]
// matrices: the host's check of a pack it cannot read.
C10_HOST_DEVICE constexpr bool is_quantized_pack_size(int64_t bytes, int64_t n, int64_t k, int64_t units) {
  if (packed_bytes(geometry(8, k, 0, units), n) == bytes) return true;
  for (int64_t group_size = 32; group_size <= 128; group_size *= 2) {
    if (packed_bytes(geometry(4, k, group_size, units), n) == bytes) return true;
  }
  return false;
}

// x[k0 + i] for i < N as fp32; 0 past K (the pack's padding holds q values whose zero point is not 0).
template <typename T, int N>
C10_HOST_DEVICE inline void load_x(const T* row, int64_t k0, int64_t k, float (&x)[N]) {
  MG_UNROLL
  for (int i = 0; i < N; ++i) x[i] = k0 + i < k ? static_cast<float>(row[k0 + i]) : 0.f;
}

// Adds one q line's share to the sums of quarter `quarter`'s 4 rows against each of x's first `rows`
// rows: sums[j][r] += scale_j * sum_i (q_ji - zero_j) * x[r][k0 + i], from the quarter's words and the
// group's params line. x row by x row, unpacking the words again for each: fewer values live at once
// (registers on CUDA).
template <int Bits, int Rows, typename T>
C10_HOST_DEVICE inline void accumulate_quarter(const Quarter& words, const GroupParams& params, int quarter,
                                               const T* x, int64_t x_stride, int rows, int64_t k0, int64_t k,
                                               float (&sums)[kQuarterRows][Rows]) {
  constexpr int kValues = kWordValues<Bits>;
  float scale[kQuarterRows];
  float zero[kQuarterRows];
  MG_UNROLL
  for (int j = 0; j < kQuarterRows; ++j) {
    scale[j] = static_cast<float>(params.scale[quarter * kQuarterRows + j]);
    zero[j] = zero_point(Bits, params.zero[quarter * kQuarterRows + j]);
  }
  MG_UNROLL
  for (int r = 0; r < Rows; ++r) {
    if (r >= rows) break;
    float xs[kValues];
    load_x<T, kValues>(x + r * x_stride, k0, k, xs);
    MG_UNROLL
    for (int j = 0; j < kQuarterRows; ++j) {
      int q[kValues];
      unpack_word<Bits>(words.word[j], q);
      float dot = 0.f;
      MG_UNROLL
      for (int i = 0; i < kValues; ++i) dot += (static_cast<float>(q[i]) - zero[j]) * xs[i];
      sums[j][r] += scale[j] * dot;
    }
  }
}

// Q lines a GEMV thread loads before it multiplies them: several 16-byte loads in flight per thread, which
// a bandwidth-bound stream needs on a GPU (one tile's block is only 4 warps).
constexpr int kLinesInFlight = 4;

// Thread `thread`'s sums over a tile (see the top of this file): sums[u][j][r] for unit u, row
// 4 * (thread % 4) + j of the tile and row r of x. The caller zeroes `sums`.
template <int Bits, int Rows, int Units, typename T>
C10_HOST_DEVICE inline void gemv_thread_sums(const uint8_t* tile, const Geometry& geo, int thread, const T* x,
                                             int64_t x_stride, int rows, int64_t k,
                                             float (&sums)[Units][kQuarterRows][Rows]) {
  const int quarter = thread % kQuarters;
  // A tile has at most K / 4 q lines per unit: 32-bit indices (cheaper divisions on a GPU).
  const int group_lines = static_cast<int>(geo.group_q_lines());
  const int lines = static_cast<int>(geo.groups()) * group_lines;
  const auto group_of = [&](int line, int unit) { return tile + geo.group_offset(line / group_lines, unit); };
  for (int first = thread / kQuarters; first < lines; first += kLineSlots * kLinesInFlight) {
    Quarter words[kLinesInFlight][Units];
    MG_UNROLL
    for (int b = 0; b < kLinesInFlight; ++b) {
      const int line = first + b * kLineSlots;
      if (line >= lines) break;
      MG_UNROLL
      for (int u = 0; u < Units; ++u) {
        words[b][u] = load_quarter(group_of(line, u) + (1 + line % group_lines) * kLineBytes +
                                   quarter * (kLineBytes / kQuarters));
      }
    }
    MG_UNROLL
    for (int b = 0; b < kLinesInFlight; ++b) {
      const int line = first + b * kLineSlots;
      if (line >= lines) break;
      const int64_t k0 = static_cast<int64_t>(line / group_lines) * geo.group_size +
                         static_cast<int64_t>(line % group_lines) * kWordValues<Bits>;
      MG_UNROLL
      for (int u = 0; u < Units; ++u) {
        accumulate_quarter<Bits, Rows>(words[b][u], *reinterpret_cast<const GroupParams*>(group_of(line, u)),
                                       quarter, x, x_stride, rows, k0, k, sums[u]);
      }
    }
  }
}

template <typename T>
struct RoundToDtype {
  C10_HOST_DEVICE float operator()(float v) const { return static_cast<float>(static_cast<T>(v)); }
};

// A gate_up output from its two fp32 sums: each rounded to T as the [T, 2F] product of the unfused
// path is, then silu_and_mul's own math (common/activation.h). Exp: the side's exponential.
template <typename T, typename Exp>
C10_HOST_DEVICE inline T silu_mul_output(float gate, float up, Exp exp) {
  const RoundToDtype<T> round;
  return static_cast<T>(silu_and_mul(round(gate), round(up), exp, round));
}

// Writes the values of quarter `quarter` of q line `line` (of every group's lines, in K order) of unit
// `unit` of the tile whose first row is `first_row` into dense [units * n, k] (unit u's rows from u * n);
// rows past n and values past K are not written.
template <int Bits, typename T>
C10_HOST_DEVICE inline void dequantize_quarter(const uint8_t* tile, const Geometry& geo, int64_t unit, int quarter,
                                               int64_t line, int64_t first_row, int64_t n, int64_t k, T* dense) {
  constexpr int kValues = kWordValues<Bits>;
  const int64_t g = line / geo.group_q_lines(), l = line % geo.group_q_lines();
  const uint8_t* group = tile + geo.group_offset(g, unit);
  const auto* params = reinterpret_cast<const GroupParams*>(group);
  const Quarter words = load_quarter(group + (1 + l) * kLineBytes + quarter * (kLineBytes / kQuarters));
  const int64_t k0 = g * geo.group_size + l * kValues;
  MG_UNROLL
  for (int j = 0; j < kQuarterRows; ++j) {
    const int64_t row = first_row + quarter * kQuarterRows + j;
    if (row >= n) continue;
    const int tile_row = quarter * kQuarterRows + j;
    const float scale = static_cast<float>(params->scale[tile_row]);
    const float zero = zero_point(Bits, params->zero[tile_row]);
    int q[kValues];
    unpack_word<Bits>(words.word[j], q);
    T* out = dense + (unit * n + row) * k;
    MG_UNROLL
    for (int i = 0; i < kValues; ++i) {
      if (k0 + i < k) out[k0 + i] = static_cast<T>(dequantize(q[i], zero, scale));
    }
  }
}

// The quarters of one tile and unit, indices [first, kQuarters * q lines) by `step`, quarter-major so
// that consecutive indices write consecutive values of a row.
template <int Bits, typename T>
C10_HOST_DEVICE inline void dequantize_tile(const uint8_t* tile, const Geometry& geo, int64_t unit, int64_t first,
                                            int64_t step, int64_t first_row, int64_t n, int64_t k, T* dense) {
  const int64_t lines = geo.groups() * geo.group_q_lines();
  for (int64_t index = first; index < kQuarters * lines; index += step) {
    dequantize_quarter<Bits>(tile, geo, unit, static_cast<int>(index / lines), index % lines, first_row, n, k, dense);
  }
}

}  // namespace mistral_grpc::quant
