// The linear kernels in plain C++ for any CPU (and the reference the ISA sets are tested against):
// 16-lane loops the compiler vectorises for whatever the baseline target has.
#include "common/linear_kernels.h"

namespace mistral_grpc::linear {
namespace portable {

struct Lanes {
  float v[kTileRows];
};

struct VectorPart {
  using Acc = Lanes;
  // 4 accumulators of 16 floats fill the 16 SSE registers of baseline x86-64.
  static constexpr int kStreams = 2;
  static constexpr int kAccumulators = 4;
  static Acc zero() { return Acc{}; }
  static Acc add(Acc a, const Acc& b) {
    for (int j = 0; j < kTileRows; ++j) a.v[j] += b.v[j];
    return a;
  }
  static Acc load(const float* src) {
    Acc a;
    std::memcpy(a.v, src, sizeof a.v);
    return a;
  }
  static void store(const Acc& a, float* dst) { std::memcpy(dst, a.v, sizeof a.v); }
};

struct Fp32 : Fp32Operands, VectorPart {
  static void step(Acc& acc, const uint8_t* line, XVal x) {
    float w[kTileRows];
    std::memcpy(w, line, sizeof w);
    for (int j = 0; j < kTileRows; ++j) acc.v[j] += w[j] * x;
  }
};

struct Bf16 : Bf16Operands, VectorPart {
  static void step(Acc& acc, const uint8_t* line, XVal x) {
    uint32_t pairs[kTileRows];
    std::memcpy(pairs, line, sizeof pairs);
    const float x_even = low(x), x_odd = high(x);
    for (int j = 0; j < kTileRows; ++j) acc.v[j] += low(pairs[j]) * x_even + high(pairs[j]) * x_odd;
  }
};

#include "common/linear_kernel_body.h"

}  // namespace portable

const KernelSet kPortableFp32 = portable::kernel_set<portable::Fp32>();
const KernelSet kPortableBf16 = portable::kernel_set<portable::Bf16>();

}  // namespace mistral_grpc::linear
