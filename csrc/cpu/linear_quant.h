// The quantized side of the CPU linear ops (cpu/linear_quant.cpp), for cpu/linear.cpp: it reads the
// shared header, and hands quantized weights over here.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/linear_pack.h"
#include "cpu/quant_kernels.h"

namespace mistral_grpc::linear {

// Quantizes `matrix` [rows, k] (float32, bfloat16 or float16) into unit `unit` of every tile of a zeroed
// pack (cpu/quantize_weight.cpp). Returns false if the matrix holds a NaN, an infinity or a value beyond
// ±quant::kMaxWeight.
bool quantize_matrix(uint8_t* tiles, const quant::Geometry& geo, const at::Tensor& matrix, int64_t unit);
// Whether a quantized header is one the CPU's quantize and pack ops can make (quant::packed_bytes: its bytes).
bool quant_header_valid(const PackedHeader& header);
// out [T, N or F] from x [T, K] (checked by the caller against the header) on the given kernels.
void run_quant(const QuantKernelSet& kernels, const PackedHeader& header, at::Tensor& out, const at::Tensor& x,
               const at::Tensor& packed);
// The exact weights a quantized pack multiplies, float32 [N, K] ([2F, K]: gate, then up).
at::Tensor dequantize_packed(const PackedHeader& header, const at::Tensor& packed);

}  // namespace mistral_grpc::linear
