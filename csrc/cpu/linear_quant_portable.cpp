// The quantized linear kernels in plain C++ for any CPU: the same integer sums and the same fp32
// fmas (std::fma) as the vector sets, so every ISA gives the same bits.
#include <cmath>

#include "cpu/quant_kernels.h"

namespace mistral_grpc::linear {
namespace portable {

struct Portable {
  struct IAcc {
    int32_t v[quant::kTileRows];
  };
  struct FAcc {
    float v[quant::kTileRows];
  };
  struct Params {
    float scale[quant::kTileRows], zero[quant::kTileRows];
  };
  using Line = const uint8_t*;
  static constexpr int kStreams = 1;
  static constexpr int kRegisters = 4;
  static constexpr int kInt4Registers = kRegisters;

  static IAcc izero() { return IAcc{}; }
  static FAcc fzero() { return FAcc{}; }

  template <int kBits>
  static Line line(const uint8_t* q) {
    return q;
  }

  template <int kBits>
  static IAcc dot(IAcc acc, Line w, const int8_t* x) {
    for (int64_t j = 0; j < quant::kTileRows; ++j) {
      for (int64_t kk = 0; kk < quant::k_per_line(kBits); ++kk) acc.v[j] += quant::q_at(w, kBits, j, kk) * x[kk];
    }
    return acc;
  }

  template <int kBits>
  static FAcc block(FAcc t, const IAcc& acc, float d, int32_t) {
    for (int64_t j = 0; j < quant::kTileRows; ++j) t.v[j] = std::fma(static_cast<float>(acc.v[j]), d, t.v[j]);
    return t;
  }

  template <int kBits>
  static Params params(const uint8_t* line) {
    const auto* gp = reinterpret_cast<const quant::GroupParams*>(line);
    Params params;
    for (int64_t j = 0; j < quant::kTileRows; ++j) {
      params.scale[j] = static_cast<float>(gp->scale[j]);
      params.zero[j] = quant::zero_point(kBits, gp->zero[j]);
    }
    return params;
  }

  static void finish(float* res, const FAcc& t, const Params& params, float x_group) {
    for (int64_t j = 0; j < quant::kTileRows; ++j) {
      res[j] = std::fma(params.scale[j], std::fma(-params.zero[j], x_group, t.v[j]), res[j]);
    }
  }
};

#include "cpu/quant_kernel_body.h"

}  // namespace portable

const QuantKernelSet kQuantPortable = portable::quant_kernel_set<portable::Portable>();

}  // namespace mistral_grpc::linear
