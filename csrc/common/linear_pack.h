// The prepacked weight format of the CPU linear kernels (CPU only; it lives beside the other
// linear headers). A decode step streams every weight once, so the layout is chosen for that
// stream: one 64-byte cache line ("step") feeds one vector FMA of 16 output rows, and a thread's
// share of the matrix is one contiguous run of memory, which it reads as a few long streams
// (common/linear_kernel_body.h).
//
//   packed = [64-byte PackedHeader][tile 0][tile 1]...      (a uint8 CPU tensor)
//   tile   = 16 output rows, `steps` cache lines long (gate_up: two of them, see below):
//     fp32: line s holds W[n0 + j, s]                      for j = 0..15     (steps = K)
//     bf16: line s holds W[n0 + j, 2s], W[n0 + j, 2s + 1] for j = 0..15     (steps = ceil(K/2))
//           i.e. the pairs vdpbf16ps multiplies against a broadcast (x[2s], x[2s+1]).
//   Rows past N and the odd column past K are zero.
//
// A gate_up tile interleaves two such tiles line by line: line 2s of tile f is line s of the gate
// rows 16f..16f+15, line 2s + 1 the same line of the up rows. One contiguous pass yields the 16
// gate and 16 up outputs that silu(gate) * up pairs, without a [T, 2F] intermediate.
// The header carries the logical shape and kind, so a raw weight, a weight of the wrong shape or
// a gate_up weight given to the plain op is a clear error instead of a wrong answer.
//
// Quantized weights (int8, int4) share the header and the 16-row tiles but lay a tile out by groups
// of K (common/quant.h); the header adds their group size and the dtype of x and out.
#pragma once

#include <cstdint>

namespace mistral_grpc::linear {

constexpr int64_t kTileRows = 16;
constexpr int64_t kStepBytes = 64;
constexpr int64_t kHeaderBytes = 64;
constexpr uint32_t kPackedMagic = 0x574c474d;  // "MGLW"

// kFloat16 names only a quantized pack's activation, and only the CUDA kernels run it.
enum class WeightDtype : uint32_t { kFloat32 = 1, kBFloat16 = 2, kInt8 = 3, kInt4 = 4, kFloat16 = 5 };
enum class PackKind : uint32_t { kLinear = 1, kGateUp = 2 };

struct PackedHeader {
  uint32_t magic;
  WeightDtype dtype;
  PackKind kind;
  uint32_t group_size;  // quantized: K values per scale (int8: the padded K); else 0
  int64_t n;  // output features: N for kLinear, F (per half) for kGateUp
  int64_t k;  // input features
  WeightDtype activation;  // quantized: the dtype of x and out (kFloat32 / kBFloat16; CUDA: kFloat16 too); else = dtype
};
static_assert(sizeof(PackedHeader) <= kHeaderBytes);

constexpr bool is_quantized(WeightDtype dtype) { return dtype == WeightDtype::kInt8 || dtype == WeightDtype::kInt4; }

// K elements of one output row per 64-byte step (the float dtypes).
constexpr int64_t k_per_step(WeightDtype dtype) { return dtype == WeightDtype::kFloat32 ? 1 : 2; }

constexpr int64_t steps_per_tile(WeightDtype dtype, int64_t k) {
  return (k + k_per_step(dtype) - 1) / k_per_step(dtype);
}

constexpr int64_t tiles_for(int64_t rows) { return (rows + kTileRows - 1) / kTileRows; }

// 16-row sub-tiles per tile: gate_up tiles carry the gate and the up rows of 16 outputs.
constexpr int64_t units_per_tile(PackKind kind) { return kind == PackKind::kGateUp ? 2 : 1; }

constexpr int64_t packed_bytes(WeightDtype dtype, PackKind kind, int64_t n, int64_t k) {
  return kHeaderBytes + tiles_for(n) * units_per_tile(kind) * steps_per_tile(dtype, k) * kStepBytes;
}

}  // namespace mistral_grpc::linear
