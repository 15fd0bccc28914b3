// Quantized CPU linear layers: the quantize and pack ops that make the packed int8 / int4 layout of
// common/quant.h (once, at load; the quantizer itself is cpu/quantize_weight.cpp), and the call that
// quantizes x per kActBlock and runs the int8 dot-product kernels of cpu/linear_quant_<isa>.cpp over
// the weight's tiles.
#include "cpu/linear_quant.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "cpu/simd.h"

#include "cpu/ops_cpu.h"
#include "ops.h"

namespace mistral_grpc::linear {
namespace {

// ---- quantizing a weight -----------------------------------------------------------------------

// The WeightDtype of a (checked) quantization scheme: "int8" or "int4".
WeightDtype scheme_dtype(c10::string_view scheme) { return scheme == "int8" ? WeightDtype::kInt8 : WeightDtype::kInt4; }

// A zeroed quantized pack of `units` [n, k] matrices with its header written, and its geometry
// (group_size as the op took it, checked).
std::pair<at::Tensor, quant::Geometry> empty_pack(WeightDtype dtype, int64_t units, int64_t n, int64_t k,
                                                  WeightDtype activation, int64_t group_size) {
  PackedHeader header{};
  header.magic = kPackedMagic;
  header.dtype = dtype;
  header.kind = units == 2 ? PackKind::kGateUp : PackKind::kLinear;
  header.n = n;
  header.k = k;
  header.activation = activation;
  const int bits = quant::bits_of(dtype);
  const quant::Geometry geo =
      quant::geometry(bits, k, quant::group_size_for(bits, group_size), units_per_tile(header.kind));
  header.group_size = static_cast<uint32_t>(geo.group_size);
  at::Tensor packed = zeroed_bytes(quant::packed_bytes(geo, n));
  std::memcpy(packed.data_ptr<uint8_t>(), &header, sizeof header);
  return {packed, geo};
}

at::Tensor quantize(const char* op, const std::vector<at::Tensor>& units, c10::string_view scheme,
                    int64_t group_size) {
  const at::Tensor& first = units.front();
  const WeightDtype activation = first.scalar_type() == at::kFloat ? WeightDtype::kFloat32 : WeightDtype::kBFloat16;
  auto [packed, geo] = empty_pack(scheme_dtype(scheme), static_cast<int64_t>(units.size()), first.size(0),
                                  first.size(1), activation, group_size);
  for (size_t u = 0; u < units.size(); ++u) {
    TORCH_CHECK(quantize_matrix(packed.data_ptr<uint8_t>() + kHeaderBytes, geo, units[u], static_cast<int64_t>(u)),
                op, ": the weight holds a NaN or an infinity, or a value beyond +-", quant::kMaxWeight,
                " (its scale would not fit in fp16)");
  }
  return packed;
}

at::Tensor quantize_linear_weight(const at::Tensor& weight, c10::string_view scheme, int64_t group_size) {
  check_quantize_linear_weight_args(weight, scheme, group_size);
  return quantize("quantize_linear_weight", {weight}, scheme, group_size);
}

at::Tensor quantize_gate_up_weight(const at::Tensor& gate, const at::Tensor& up, c10::string_view scheme,
                                   int64_t group_size) {
  check_quantize_gate_up_weight_args(gate, up, scheme, group_size);
  return quantize("quantize_gate_up_weight", {gate, up}, scheme, group_size);
}

// ---- packing values quantized elsewhere (pre-quantized checkpoints) ---------------------------

// Writes unit `unit_index` of every tile: each row's scales (rounded to the nearest fp16), zero
// points (int4: as sixteenths) and q values, group by group.
void pack_unit(uint8_t* tiles, const quant::Geometry& geo, const QuantizedUnit& unit, int64_t unit_index) {
  const at::Tensor q = unit.q.contiguous(), zero = unit.zero.contiguous();
  const at::Tensor scale = unit.scale.to(at::kFloat).contiguous();
  const int64_t rows = q.size(0), k = q.size(1), groups = geo.groups();
  const uint8_t* q_rows = q.data_ptr<uint8_t>();
  const uint8_t* zeros = zero.data_ptr<uint8_t>();
  const float* scales = scale.data_ptr<float>();
  at::parallel_for(0, tiles_for(rows), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      uint8_t* tile = tiles + t * geo.tile_bytes();
      for (int64_t j = 0; j < std::min(kTileRows, rows - t * kTileRows); ++j) {
        const int64_t n = t * kTileRows + j;
        for (int64_t g = 0; g < groups; ++g) {
          uint8_t* group = tile + geo.group_offset(g, unit_index);
          auto* gp = reinterpret_cast<quant::GroupParams*>(group);
          gp->scale[j] = c10::Half(scales[n * groups + g]);
          gp->zero[j] = quant::stored_zero(geo.bits, zeros[n * groups + g]);
          const int64_t first = g * geo.group_size, valid = std::min(geo.group_size, k - first);
          for (int64_t kk = 0; kk < valid; ++kk) {
            quant::store_q(group + quant::kLineBytes, geo.bits, j, kk, q_rows[n * k + first + kk]);
          }
        }
      }
    }
  });
}

at::Tensor pack_quantized(const char* op, const std::vector<QuantizedUnit>& units, int64_t bits, int64_t group_size,
                          at::ScalarType activation) {
  check_pack_quantized_args(op, units, bits, group_size, activation);
  const WeightDtype dtype = bits == 8 ? WeightDtype::kInt8 : WeightDtype::kInt4;
  const at::Tensor& first = units.front().q;
  auto [packed, geo] = empty_pack(dtype, static_cast<int64_t>(units.size()), first.size(0), first.size(1),
                                  activation == at::kFloat ? WeightDtype::kFloat32 : WeightDtype::kBFloat16,
                                  group_size);
  for (size_t u = 0; u < units.size(); ++u) {
    pack_unit(packed.data_ptr<uint8_t>() + kHeaderBytes, geo, units[u], static_cast<int64_t>(u));
  }
  return packed;
}

at::Tensor pack_quantized_weight(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                                 int64_t group_size, at::ScalarType activation) {
  return pack_quantized("pack_quantized_weight", {{.name = "weight", .q = q, .scale = scale, .zero = zero}}, bits,
                        group_size, activation);
}

at::Tensor pack_quantized_gate_up_weight(const at::Tensor& gate_q, const at::Tensor& gate_scale,
                                         const at::Tensor& gate_zero, const at::Tensor& up_q,
                                         const at::Tensor& up_scale, const at::Tensor& up_zero, int64_t bits,
                                         int64_t group_size, at::ScalarType activation) {
  return pack_quantized("pack_quantized_gate_up_weight",
                        {{.name = "gate", .q = gate_q, .scale = gate_scale, .zero = gate_zero},
                         {.name = "up", .q = up_q, .scale = up_scale, .zero = up_zero}},
                        bits, group_size, activation);
}

// ---- quantizing x ------------------------------------------------------------------------------

// x's rows quantized per kActBlock, in a calling thread's scratch kept between calls.
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> scale, group;
  std::vector<int32_t> sum;
};

// Round half to even for |v| < 2^22, as torch.round and the vector conversions do, without libm.
MG_ALWAYS_INLINE float round_even(float v) {
  constexpr float kMagic = 12582912.f;  // 1.5 * 2^23
  return (v + kMagic) - kMagic;
}

template <typename T>
MG_CPU_CLONES void quantize_row(const T* x, int64_t k, const quant::Geometry& geo, int8_t* q, float* scale,
                                int32_t* sum, float* group) {
  const int64_t blocks = geo.padded_k / quant::kActBlock;
  for (int64_t b = 0; b < blocks; ++b) {
    float values[quant::kActBlock];
    float max_abs = 0.f;
    for (int64_t i = 0; i < quant::kActBlock; ++i) {
      const int64_t kk = b * quant::kActBlock + i;
      values[i] = kk < k ? static_cast<float>(x[kk]) : 0.f;
      max_abs = std::max(max_abs, std::fabs(values[i]));
    }
    const float inverse = max_abs > 0.f ? 127.f / max_abs : 0.f;
    int32_t total = 0;
    for (int64_t i = 0; i < quant::kActBlock; ++i) {
      const auto v = static_cast<int8_t>(round_even(values[i] * inverse));
      q[b * quant::kActBlock + i] = v;
      total += v;
    }
    scale[b] = max_abs / 127.f;
    sum[b] = total;
  }
  const int64_t per_group = geo.group_size / quant::kActBlock;
  for (int64_t g = 0; g < geo.groups(); ++g) {
    float total = 0.f;
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) total += scale[b] * static_cast<float>(sum[b]);
    group[g] = total;
  }
}

void quantize_rows(const at::Tensor& x, const quant::Geometry& geo, QuantizedRows& rows) {
  const int64_t count = x.size(0), k = x.size(1), blocks = geo.padded_k / quant::kActBlock;
  rows.q.resize(count * geo.padded_k);
  rows.scale.resize(count * blocks);
  rows.sum.resize(count * blocks);
  rows.group.resize(count * geo.groups());
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int8_t* q = rows.q.data() + r * geo.padded_k;
      float* scale = rows.scale.data() + r * blocks;
      int32_t* sum = rows.sum.data() + r * blocks;
      float* group = rows.group.data() + r * geo.groups();
      if (x.scalar_type() == at::kFloat) {
        quantize_row(x.data_ptr<float>() + r * x.stride(0), k, geo, q, scale, sum, group);
      } else {
        quantize_row(x.data_ptr<c10::BFloat16>() + r * x.stride(0), k, geo, q, scale, sum, group);
      }
    }
  });
}

}  // namespace

bool quant_header_valid(const PackedHeader& header) {
  const bool float_activation =
      header.activation == WeightDtype::kFloat32 || header.activation == WeightDtype::kBFloat16;
  return float_activation && header.n > 0 && header.k > 0 && quant::scheme_valid(header);
}

void run_quant(const QuantKernelSet& kernels, const PackedHeader& header, at::Tensor& out, const at::Tensor& x,
               const at::Tensor& packed) {
  const int64_t rows = x.size(0);
  if (rows == 0) return;
  const quant::Geometry geo = quant::header_geometry(header);
  thread_local QuantizedRows quantized;
  quantize_rows(x, geo, quantized);
  const QuantProblem problem{.tiles = packed.data_ptr<uint8_t>() + kHeaderBytes,
                             .geometry = geo,
                             .rows = rows,
                             .x_q = quantized.q.data(),
                             .x_scale = quantized.scale.data(),
                             .x_sum = quantized.sum.data(),
                             .x_group = quantized.group.data(),
                             .output = Problem{.out = out.data_ptr(), .out_stride = out.stride(0), .n = header.n},
                             .bf16_output = out.scalar_type() == at::kBFloat16};
  const bool gate_up = header.kind == PackKind::kGateUp;
  const QuantTileRangeFn fn = geo.bits == 8 ? (gate_up ? kernels.int8_silu_mul : kernels.int8_linear)
                                            : (gate_up ? kernels.int4_silu_mul : kernels.int4_linear);
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / geo.tile_bytes());
  at::parallel_for(0, tiles_for(header.n), grain, [&](int64_t begin, int64_t end) { fn(problem, begin, end); });
}

at::Tensor dequantize_packed(const PackedHeader& header, const at::Tensor& packed) {
  const quant::Geometry geo = quant::header_geometry(header);
  at::Tensor weight = at::empty({header.n * geo.units, header.k}, at::TensorOptions().dtype(at::kFloat));
  float* w = weight.data_ptr<float>();
  const uint8_t* tiles = packed.data_ptr<uint8_t>() + kHeaderBytes;
  at::parallel_for(0, header.n * geo.units, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t unit = r / header.n, n = r % header.n;
      const uint8_t* tile = tiles + (n / kTileRows) * geo.tile_bytes();
      const int64_t j = n % kTileRows;
      for (int64_t kk = 0; kk < header.k; ++kk) {
        const uint8_t* group = tile + geo.group_offset(kk / geo.group_size, unit);
        const auto* gp = reinterpret_cast<const quant::GroupParams*>(group);
        const int q = quant::q_at(group + quant::kLineBytes, geo.bits, j, kk % geo.group_size);
        w[r * header.k + kk] =
            quant::dequantize(q, quant::zero_point(geo.bits, gp->zero[j]), static_cast<float>(gp->scale[j]));
      }
    }
  });
  return weight;
}

TORCH_LIBRARY_IMPL(mistral_grpc, CPU, m) {
  m.impl("quantize_linear_weight", &quantize_linear_weight);
  m.impl("quantize_gate_up_weight", &quantize_gate_up_weight);
  m.impl("pack_quantized_weight", &pack_quantized_weight);
  m.impl("pack_quantized_gate_up_weight", &pack_quantized_gate_up_weight);
}

}  // namespace mistral_grpc::linear
