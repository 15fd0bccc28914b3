// The CUDA quantized linear kernels' arithmetic (common/quant_gemv.h) run on the CPU, one emulated thread
// after the other: tests prove the kernels' math here, where there is no GPU, and cuda/linear_quant.cu adds
// only the thread mapping around the same functions. Not a serving path: slow, and single-threaded.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>

#include "common/dispatch.h"
#include "common/quant_gemv.h"
#include "ops.h"

namespace mistral_grpc {
namespace {

using linear::PackedHeader;
using linear::PackKind;

struct StdExp {
  float operator()(float v) const { return std::exp(v); }
};

// The pack's header, checked as the kernels check it on the device (there, a device-side assert).
template <typename T>
PackedHeader checked_header(const char* op, const at::Tensor& packed, PackKind kind, int64_t n, int64_t k) {
  TORCH_CHECK(packed.device().is_cpu() && packed.numel() >= linear::kHeaderBytes, op,
              ": packed_weight must be a CPU pack of at least ", linear::kHeaderBytes, " bytes");
  PackedHeader header;
  std::memcpy(&header, packed.const_data_ptr<uint8_t>(), sizeof header);
  TORCH_CHECK(quant::header_matches(header, kind, n, k, quant::activation_of<T>(), packed.numel()), op,
              ": the packed weight's header does not describe a quantized ",
              kind == PackKind::kGateUp ? "gate_up " : "", "[", n, ", ", k, "] pack for ",
              c10::CppTypeToScalarType<T>::value,
              " x (the CUDA kernels stop on a device-side assert here)");
  return header;
}

// One tile's outputs for rows [first, first + rows) of x, rows <= kGemvMaxRows: every emulated thread's
// sums (gemv_thread_sums), added up, then the kernel's epilogue.
template <int Bits, int Units, typename T>
void gemv_tile(const uint8_t* tile, const quant::Geometry& geo, int64_t tile_index, const T* x, int64_t x_stride,
               int rows, int64_t n, int64_t k, T* out, int64_t out_stride) {
  constexpr int kRows = quant::kGemvMaxRows;
  float total[Units][quant::kTileRows][kRows] = {};
  for (int thread = 0; thread < quant::kGemvThreads; ++thread) {
    float sums[Units][quant::kQuarterRows][kRows] = {};
    quant::gemv_thread_sums<Bits, kRows, Units>(tile, geo, thread, x, x_stride, rows, k, sums);
    const int quarter = thread % quant::kQuarters;
    for (int u = 0; u < Units; ++u) {
      for (int j = 0; j < quant::kQuarterRows; ++j) {
        for (int r = 0; r < kRows; ++r) total[u][quarter * quant::kQuarterRows + j][r] += sums[u][j][r];
      }
    }
  }
  for (int64_t j = 0; j < quant::kTileRows && tile_index * quant::kTileRows + j < n; ++j) {
    for (int r = 0; r < rows; ++r) {
      T& y = out[r * out_stride + tile_index * quant::kTileRows + j];
      if constexpr (Units == 1) {
        y = static_cast<T>(total[0][j][r]);
      } else {
        y = quant::silu_mul_output<T>(total[0][j][r], total[1][j][r], StdExp{});
      }
    }
  }
}

template <int Bits, int Units, typename T>
void gemv(const uint8_t* packed, const quant::Geometry& geo, const at::Tensor& x, at::Tensor& out) {
  const int64_t n = out.size(1), k = x.size(1);
  for (int64_t first = 0; first < x.size(0); first += quant::kGemvMaxRows) {
    const int rows = static_cast<int>(std::min<int64_t>(quant::kGemvMaxRows, x.size(0) - first));
    for (int64_t t = 0; t < linear::tiles_for(n); ++t) {
      gemv_tile<Bits, Units>(packed + linear::kHeaderBytes + t * geo.tile_bytes(), geo, t,
                             x.const_data_ptr<T>() + first * x.stride(0), x.stride(0), rows, n, k,
                             out.mutable_data_ptr<T>() + first * out.stride(0), out.stride(0));
    }
  }
}

// linear (a plain pack) or linear_silu_mul (a gate_up pack) as the CUDA GEMV computes it, whatever the rows.
void cuda_quant_math_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed) {
  const char* op = "cuda_quant_math_linear";
  // The kind picks the op the kernels would run (linear or linear_silu_mul); the checks follow.
  PackedHeader header{};
  if (packed.nbytes() >= sizeof header) std::memcpy(&header, packed.const_data_ptr(), sizeof header);
  const bool gate_up = header.kind == PackKind::kGateUp;
  check_quantized_linear_args(op, out, x, packed, gate_up ? 2 : 1, -1);
  MG_DISPATCH_FLOAT_TYPES(x.scalar_type(), "cuda_quant_math_linear", [&] {
    checked_header<scalar_t>(op, packed, header.kind, out.size(1), x.size(1));
    const quant::Geometry geo = quant::header_geometry(header);
    const uint8_t* bytes = packed.const_data_ptr<uint8_t>();
    if (geo.bits == 8) {
      gate_up ? gemv<8, 2, scalar_t>(bytes, geo, x, out) : gemv<8, 1, scalar_t>(bytes, geo, x, out);
    } else {
      gate_up ? gemv<4, 2, scalar_t>(bytes, geo, x, out) : gemv<4, 1, scalar_t>(bytes, geo, x, out);
    }
  });
}

// The dense [units * N, K] matrix in `dtype` (the pack's activation dtype) that the CUDA prefill path
// multiplies with cuBLAS.
at::Tensor cuda_quant_math_dequantize(const at::Tensor& packed, at::ScalarType dtype) {
  const char* op = "cuda_quant_math_dequantize";
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.dim() == 1 &&
                  packed.is_contiguous() && packed.numel() >= linear::kHeaderBytes,
              op, ": packed_weight must be a 1-D contiguous uint8 CPU pack");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": dtype must be float32, bfloat16 or float16, got ", dtype);
  PackedHeader header;
  std::memcpy(&header, packed.const_data_ptr<uint8_t>(), sizeof header);
  at::Tensor dense;
  MG_DISPATCH_FLOAT_TYPES(dtype, "cuda_quant_math_dequantize", [&] {
    checked_header<scalar_t>(op, packed, header.kind, header.n, header.k);
    const quant::Geometry geo = quant::header_geometry(header);
    dense = at::empty({geo.units * header.n, header.k}, at::TensorOptions().dtype(dtype));
    for (int64_t t = 0; t < linear::tiles_for(header.n); ++t) {
      const uint8_t* tile = packed.const_data_ptr<uint8_t>() + linear::kHeaderBytes + t * geo.tile_bytes();
      for (int64_t u = 0; u < geo.units; ++u) {
        const auto run = [&](auto bits) {
          quant::dequantize_tile<decltype(bits)::value>(tile, geo, u, 0, 1, t * quant::kTileRows, header.n, header.k,
                                                        dense.mutable_data_ptr<scalar_t>());
        };
        geo.bits == 8 ? run(std::integral_constant<int, 8>{}) : run(std::integral_constant<int, 4>{});
      }
    }
  });
  return dense;
}

}  // namespace

TORCH_LIBRARY_IMPL(mistral_grpc, CPU, m) {
  m.impl("cuda_quant_math_linear", &cuda_quant_math_linear);
  m.impl("cuda_quant_math_dequantize", &cuda_quant_math_dequantize);
}

}  // namespace mistral_grpc
