// What the quantized CPU linear op (cpu/linear_quant.cpp) calls and what each ISA's translation unit
// (cpu/linear_quant_{portable,avx2,avx512}.cpp) provides: int8 dot products of the quantized
// activations with int8 / int4 weight tiles (layout and arithmetic: common/quant.h).
#pragma once

#include <cstdint>

#include "common/linear_kernels.h"
#include "common/quant.h"

namespace mistral_grpc::linear {

// One call's operands, shared by every tile range the threads split it into.
struct QuantProblem {
  const uint8_t* tiles;  // tile 0 (just past the header)
  quant::Geometry geometry;
  int64_t rows;
  const int8_t* x_q;      // [rows, padded_k]: the activations quantized per kActBlock
  const float* x_scale;   // [rows, padded_k / kActBlock]: each block's d
  const int32_t* x_sum;   // [rows, padded_k / kActBlock]: each block's sum of x_q
  const float* x_group;   // [rows, groups]: sum over each group's blocks of d * sum(x_q)
  Problem output;         // out, out_stride and n, for the epilogues of common/linear_kernels.h
  bool bf16_output;       // out is bfloat16 (else float32)
};

using QuantTileRangeFn = void (*)(const QuantProblem&, int64_t begin, int64_t end);

struct QuantKernelSet {
  QuantTileRangeFn int8_linear, int8_silu_mul, int4_linear, int4_silu_mul;
};

extern const QuantKernelSet kQuantPortable;
#if MG_LINEAR_X86_KERNELS
extern const QuantKernelSet kQuantAvx2;
extern const QuantKernelSet kQuantAvx512Vnni;
#endif

}  // namespace mistral_grpc::linear
