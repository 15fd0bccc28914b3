// Weight-only quantization shared by the CPU and CUDA kernels: the packed layout of an int8 or int4
// weight and the arithmetic that (de)quantizes it. Host-device, so both sides read one definition.
//
//   weight  w[n, k] ~= (q[n, k] - zero[n, g]) * scale[n, g],   g = k / group_size
//     int8: symmetric, one group per row (per output channel): q = round(w / scale) + 128 in [1, 255],
//           zero = 128, scale = max|w| / 127.
//     int4: asymmetric groups of group_size (32, 64 or 128) along K: q in [0, 15], zero in sixteenths
//           (kInt4ZeroStep) from 0 to 15 + 15/16, so the grid's minimum, -zero * scale, can be placed
//           within scale / 32 of any value at or below 0. The quantizer (cpu/quantize_weight.cpp)
//           searches each row's scale and minimum for the least squared error, starting from the
//           range [min, max] widened to hold 0.
//   Scales are stored as fp16, never below kMinScale (fp16's smallest normal), and q is computed
//   against the stored scale and zero: (q - zero) * scale is exactly the weight the kernels multiply
//   (int8: within scale / 2 of the source, the scale rounded up).
//
// Packed layout: a 64-byte PackedHeader (common/linear_pack.h), then per 16 output rows a tile; a
// tile is its groups in K order, and per group (for gate_up: the gate unit, then the up unit) one
// GroupParams line followed by the group's q lines. A q line holds 16 rows x 4 bytes: byte 4j + i is
// row j's value for K offset i (int8: the line's 4 K values; int4: low nibble K offset i, high nibble
// K offset 4 + i of the line's 8). That is the operand layout of one vpdpbusd per 4 K values:
// 16 int32 lanes, one per row, each summing 4 products with the broadcast activations.
// K is padded with zeros to whole groups (int8: to a multiple of kActBlock), rows to a whole tile.
//
// The activations are quantized too (the CPU kernels): per row and kActBlock values of K,
//   d = max|x| / 127, x_q = round_half_even(x * (127 / max|x|)) in [-127, 127],
// and a row's dot product with row n of W over one group is
//   scale * (sum_b d_b * sum_k q * x_q  -  zero * sum_b d_b * sum_k x_q)   (b: the group's blocks).
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "common/linear_pack.h"

namespace mistral_grpc::quant {

constexpr int64_t kTileRows = 16;
constexpr int64_t kLineBytes = 64;
constexpr int64_t kActBlock = 32;  // activation values per int8 scale
constexpr int kInt8Zero = 128;
constexpr float kInt4ZeroStep = 1.f / 16;  // an int4 zero byte counts these
constexpr float kMinScale = 6.103515625e-05f;  // 2^-14
// The largest |weight| the quantizer takes: any group's range within it has an fp16 scale (fp16's
// largest is 65504; int4 divides a range of up to twice this by 15, int8 a maximum by 127).
constexpr float kMaxWeight = 65504.f * 7;

// One line of a group's parameters: the 16 rows' scales and zero points (stored as zero_point reads them).
struct GroupParams {
  c10::Half scale[kTileRows];
  uint8_t zero[kTileRows];
  uint8_t unused[kTileRows];
};
static_assert(sizeof(GroupParams) == kLineBytes);

C10_HOST_DEVICE constexpr int64_t k_per_line(int bits) { return bits == 8 ? 4 : 8; }

C10_HOST_DEVICE constexpr int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// The packed geometry of one quantized weight.
struct Geometry {
  int bits;             // 8 or 4
  int64_t group_size;   // K values per scale (int8: padded_k)
  int64_t padded_k;     // K rounded up to whole groups
  int64_t units;        // 1, or 2 for a gate_up pack

  C10_HOST_DEVICE constexpr int64_t groups() const { return padded_k / group_size; }
  C10_HOST_DEVICE constexpr int64_t group_q_lines() const { return group_size / k_per_line(bits); }
  // A group's params line and q lines, for one unit.
  C10_HOST_DEVICE constexpr int64_t unit_group_bytes() const { return (1 + group_q_lines()) * kLineBytes; }
  C10_HOST_DEVICE constexpr int64_t tile_bytes() const { return groups() * units * unit_group_bytes(); }
  // Offset in a tile of group g of unit u (its params line; the q lines follow).
  C10_HOST_DEVICE constexpr int64_t group_offset(int64_t g, int64_t u) const {
    return (g * units + u) * unit_group_bytes();
  }
};

// group_size 0 picks the scheme's own: int8 one group per row, int4 kDefaultInt4Group.
constexpr int64_t kDefaultInt4Group = 32;

// The group size geometry() takes for a quantize or pack call's (checked) group_size: int8 ignores it.
constexpr int64_t group_size_for(int bits, int64_t group_size) {
  return bits == 8 ? 0 : (group_size == 0 ? kDefaultInt4Group : group_size);
}

C10_HOST_DEVICE constexpr Geometry geometry(int bits, int64_t k, int64_t group_size, int64_t units) {
  if (bits == 8) {
    const int64_t padded = round_up(k, kActBlock);
    return Geometry{.bits = 8, .group_size = padded, .padded_k = padded, .units = units};
  }
  return Geometry{.bits = 4, .group_size = group_size, .padded_k = round_up(k, group_size), .units = units};
}

C10_HOST_DEVICE constexpr bool is_int4_group_size(int64_t group_size) {
  return group_size == 32 || group_size == 64 || group_size == 128;
}

// The bits of a quantized WeightDtype (kInt8 or kInt4).
C10_HOST_DEVICE constexpr int bits_of(linear::WeightDtype dtype) { return dtype == linear::WeightDtype::kInt8 ? 8 : 4; }

// The geometry a quantized pack's header describes.
C10_HOST_DEVICE constexpr Geometry header_geometry(const linear::PackedHeader& header) {
  return geometry(bits_of(header.dtype), header.k, header.group_size,
                  header.kind == linear::PackKind::kGateUp ? 2 : 1);
}

// Whether a quantized header's scheme is one the quantize and pack ops make: int8 in one group of the
// padded K, or int4 in groups of 32, 64 or 128.
C10_HOST_DEVICE constexpr bool scheme_valid(const linear::PackedHeader& header) {
  if (header.dtype == linear::WeightDtype::kInt8) return header.group_size == round_up(header.k, kActBlock);
  return header.dtype == linear::WeightDtype::kInt4 && is_int4_group_size(header.group_size);
}

// The bytes of a quantized pack of n rows: the header and the tiles.
C10_HOST_DEVICE constexpr int64_t packed_bytes(const Geometry& geo, int64_t n) {
  return linear::kHeaderBytes + (n + kTileRows - 1) / kTileRows * geo.tile_bytes();
}

C10_HOST_DEVICE constexpr int64_t packed_bytes(const linear::PackedHeader& header) {
  return packed_bytes(header_geometry(header), header.n);
}

// Row j's q value at K offset kk of a group whose q lines start at `lines`.
C10_HOST_DEVICE inline int q_at(const uint8_t* lines, int bits, int64_t j, int64_t kk) {
  if (bits == 8) return lines[(kk / 4) * kLineBytes + j * 4 + kk % 4];
  const int64_t i = kk % 8;
  const uint8_t byte = lines[(kk / 8) * kLineBytes + j * 4 + i % 4];
  return i < 4 ? byte & 0xf : byte >> 4;
}

// Writes row j's q value at K offset kk of a group whose q lines start at `lines` (zeroed before).
C10_HOST_DEVICE inline void store_q(uint8_t* lines, int bits, int64_t j, int64_t kk, int q) {
  if (bits == 8) {
    lines[(kk / 4) * kLineBytes + j * 4 + kk % 4] = static_cast<uint8_t>(q);
    return;
  }
  const int64_t i = kk % 8;
  lines[(kk / 8) * kLineBytes + j * 4 + i % 4] |= static_cast<uint8_t>(i < 4 ? q : q << 4);
}

// What one count of a stored zero byte stands for: int8 1, int4 kInt4ZeroStep.
C10_HOST_DEVICE constexpr float zero_unit(int bits) { return bits == 8 ? 1.f : kInt4ZeroStep; }

// The zero point a stored zero byte means, and the byte that stores a zero point (a whole number of
// zero_unit, in range). Both exact: the unit is a power of two.
C10_HOST_DEVICE inline float zero_point(int bits, uint8_t stored) {
  return static_cast<float>(stored) * zero_unit(bits);
}

C10_HOST_DEVICE inline uint8_t stored_zero(int bits, float zero) {
  return static_cast<uint8_t>(zero / zero_unit(bits));
}

// Exact in fp32: q - zero has at most 13 significant bits (a whole number or sixteenths below 256),
// and an fp16 scale 11.
C10_HOST_DEVICE inline float dequantize(int q, float zero, float scale) {
  return (static_cast<float>(q) - zero) * scale;
}

}  // namespace mistral_grpc::quant
