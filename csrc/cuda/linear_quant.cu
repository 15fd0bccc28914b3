// Quantized (int8 / int4 weight-only) linear and linear_silu_mul on CUDA, on the packs the CPU makes
// (common/quant.h), moved to the GPU as they are. Arithmetic in common/quant_gemv.h, shared with the CPU
// (cpu/quant_cuda_math.cpp runs it in the tests); this file adds the thread mapping and the launches.
//
// The host never reads the pack (that would be a device-to-host copy, a sync, per linear): the grid comes
// from x's and out's shapes, the host checks that the pack's size fits them (check_quantized_linear_args),
// and every block reads the 64-byte header (cached) and asserts that it matches the shapes and x's dtype.
//   - up to kGemvMaxRows rows (decode): a GEMV that streams the pack once, one block per 16-row tile;
//   - more rows (prefill): the pack dequantized into a dense [units * N, K] matrix in x's dtype, then
//     cuBLAS (at::mm), and silu_and_mul for a gate_up pack.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/dispatch.h"
#include "common/quant_gemv.h"
#include "cuda/device.cuh"
#include "ops.h"

namespace mistral_grpc {
namespace {

using linear::PackedHeader;
using linear::PackKind;

constexpr int kWarps = quant::kGemvThreads / cuda::kWarpSize;
constexpr int kDequantizeThreads = 256;

// The pack's header, asserted to describe a quantized `kind` pack of `bytes` bytes for x [*, k] of dtype T
// and out [*, n]. A mismatch stops the kernel (a device-side assert) before it reads a tile.
template <typename T>
__device__ __forceinline__ quant::Geometry checked_geometry(const uint8_t* packed, int64_t bytes, PackKind kind,
                                                            int64_t n, int64_t k) {
  const PackedHeader header = *reinterpret_cast<const PackedHeader*>(packed);
  CUDA_KERNEL_ASSERT_MSG(quant::header_matches(header, kind, n, k, quant::activation_of<T>(), bytes),
                         "quantized linear: the packed weight's header does not match x, out or the op");
  return quant::header_geometry(header);
}

// Adds each thread's sums over the threads of its quarter (lanes 4 apart in a warp, then the warps):
// `partial` gets [warp][unit][tile row][x row].
template <int Rows, int Units>
__device__ __forceinline__ void reduce_to_shared(float (&sums)[Units][quant::kQuarterRows][Rows],
                                                 float (&partial)[kWarps][Units][quant::kTileRows][Rows]) {
  const int lane = threadIdx.x % cuda::kWarpSize, warp = threadIdx.x / cuda::kWarpSize;
#pragma unroll
  for (int u = 0; u < Units; ++u) {
#pragma unroll
    for (int j = 0; j < quant::kQuarterRows; ++j) {
#pragma unroll
      for (int r = 0; r < Rows; ++r) {
        float v = sums[u][j][r];
        for (int offset = quant::kQuarters; offset < cuda::kWarpSize; offset *= 2) {
          v += __shfl_xor_sync(0xffffffffu, v, offset);
        }
        if (lane < quant::kQuarters) partial[warp][u][lane * quant::kQuarterRows + j][r] = v;
      }
    }
  }
  __syncthreads();
}

// out [rows, n] (rows <= Rows) from x [rows, k] and a pack of Units (1: linear, 2: gate_up + silu) [n, k]
// matrices; one block of kGemvThreads per 16-row tile.
template <typename T, int Rows, int Units>
__global__ void __launch_bounds__(quant::kGemvThreads)
    quant_gemv_kernel(T* __restrict__ out, int64_t out_stride, const T* __restrict__ x, int64_t x_stride,
                      const uint8_t* __restrict__ packed, int64_t bytes, int64_t n, int64_t k, int rows) {
  const quant::Geometry geo =
      checked_geometry<T>(packed, bytes, Units == 2 ? PackKind::kGateUp : PackKind::kLinear, n, k);
  const uint8_t* tile = packed + linear::kHeaderBytes + blockIdx.x * geo.tile_bytes();
  float sums[Units][quant::kQuarterRows][Rows] = {};
  if (geo.bits == 8) {
    quant::gemv_thread_sums<8, Rows, Units>(tile, geo, threadIdx.x, x, x_stride, rows, k, sums);
  } else {
    quant::gemv_thread_sums<4, Rows, Units>(tile, geo, threadIdx.x, x, x_stride, rows, k, sums);
  }
  __shared__ float partial[kWarps][Units][quant::kTileRows][Rows];
  reduce_to_shared<Rows, Units>(sums, partial);
  for (int index = threadIdx.x; index < quant::kTileRows * Rows; index += blockDim.x) {
    const int j = index / Rows, r = index % Rows;
    const int64_t row = blockIdx.x * quant::kTileRows + j;
    if (r >= rows || row >= n) continue;
    float total[Units] = {};
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
#pragma unroll
      for (int u = 0; u < Units; ++u) total[u] += partial[w][u][j][r];
    }
    if constexpr (Units == 1) {
      out[r * out_stride + row] = static_cast<T>(total[0]);
    } else {
      out[r * out_stride + row] = quant::silu_mul_output<T>(total[0], total[1], cuda::Exp{});
    }
  }
}

// dense [units * n, k] in T from the pack; blockIdx.x is the tile, blockIdx.y the unit.
template <typename T>
__global__ void __launch_bounds__(kDequantizeThreads)
    dequantize_kernel(T* __restrict__ dense, const uint8_t* __restrict__ packed, int64_t bytes, PackKind kind,
                      int64_t n, int64_t k) {
  const quant::Geometry geo = checked_geometry<T>(packed, bytes, kind, n, k);
  const uint8_t* tile = packed + linear::kHeaderBytes + blockIdx.x * geo.tile_bytes();
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * quant::kTileRows;
  if (geo.bits == 8) {
    quant::dequantize_tile<8>(tile, geo, blockIdx.y, threadIdx.x, blockDim.x, first_row, n, k, dense);
  } else {
    quant::dequantize_tile<4>(tile, geo, blockIdx.y, threadIdx.x, blockDim.x, first_row, n, k, dense);
  }
}

// The smallest GEMV width (1, 2, 4 or kGemvMaxRows) that holds `rows`.
template <typename Launch>
void with_gemv_rows(int64_t rows, Launch launch) {
  if (rows == 1) return launch(std::integral_constant<int, 1>{});
  if (rows == 2) return launch(std::integral_constant<int, 2>{});
  if (rows <= 4) return launch(std::integral_constant<int, 4>{});
  launch(std::integral_constant<int, quant::kGemvMaxRows>{});
}

template <typename T, int Units>
void launch_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, cudaStream_t stream) {
  const int64_t n = out.size(1), k = x.size(1), rows = x.size(0);
  with_gemv_rows(rows, [&](auto width) {
    quant_gemv_kernel<T, decltype(width)::value, Units><<<linear::tiles_for(n), quant::kGemvThreads, 0, stream>>>(
        out.mutable_data_ptr<T>(), out.stride(0), x.const_data_ptr<T>(), x.stride(0),
        packed.const_data_ptr<uint8_t>(), packed.numel(), n, k, static_cast<int>(rows));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The pack as a dense [units * n, k] matrix in x's dtype (gate rows, then up rows).
template <typename T>
at::Tensor dequantized(const at::Tensor& packed, PackKind kind, int64_t n, int64_t k, const at::Tensor& x,
                       cudaStream_t stream) {
  const int64_t units = linear::units_per_tile(kind);
  at::Tensor dense = at::empty({units * n, k}, x.options());
  const dim3 grid(linear::tiles_for(n), units);
  dequantize_kernel<T><<<grid, kDequantizeThreads, 0, stream>>>(dense.mutable_data_ptr<T>(),
                                                                 packed.const_data_ptr<uint8_t>(), packed.numel(),
                                                                 kind, n, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dense;
}

void run_silu_and_mul(at::Tensor& out, const at::Tensor& gate_up) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mistral_grpc::silu_and_mul", "")
                             .typed<void(at::Tensor&, const at::Tensor&)>();
  op.call(out, gate_up);
}

void run_quantized(const char* op, at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, PackKind kind,
                   int64_t prompt_rows) {
  const int64_t units = linear::units_per_tile(kind);
  check_quantized_linear_args(op, out, x, packed, units, prompt_rows);
  TORCH_CHECK(x.is_cuda(), op, ": x must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), n = out.size(1), k = x.size(1);
  if (rows == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // prompt_rows changes nothing here: a row takes the GEMV or the GEMM by the batch's size (the CUDA
  // exception to batch-independent rows, docs/quantization.md).
  MG_DISPATCH_FLOAT_TYPES(x.scalar_type(), "quantized linear (CUDA)", [&] {
    if (rows <= quant::kGemvMaxRows) {
      units == 2 ? launch_gemv<scalar_t, 2>(out, x, packed, stream) : launch_gemv<scalar_t, 1>(out, x, packed, stream);
      return;
    }
    const at::Tensor dense = dequantized<scalar_t>(packed, kind, n, k, x, stream);
    if (units == 1) {
      at::mm_out(out, x, dense.t());
      return;
    }
    const at::Tensor gate_up = at::mm(x, dense.t());
    if (out.is_contiguous()) {
      run_silu_and_mul(out, gate_up);
    } else {
      at::Tensor activated = at::empty({rows, n}, x.options());
      run_silu_and_mul(activated, gate_up);
      out.copy_(activated);
    }
  });
}

void linear_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed_weight, int64_t prompt_rows) {
  run_quantized("linear", out, x, packed_weight, PackKind::kLinear, prompt_rows);
}

void linear_silu_mul_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed_gate_up,
                          int64_t prompt_rows) {
  run_quantized("linear_silu_mul", out, x, packed_gate_up, PackKind::kGateUp, prompt_rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(mistral_grpc, CUDA, m) {
  m.impl("linear", &linear_cuda);
  m.impl("linear_silu_mul", &linear_silu_mul_cuda);
}

}  // namespace mistral_grpc
