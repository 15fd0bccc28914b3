// RMSNorm kernels on CPU: one row per task, fp32 accumulation, vectorised by the compiler.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common/norm.h"

namespace mistral_grpc {
namespace {

void check_norm_args(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.numel(), "rms_norm: x's last dim (", x.size(-1),
              ") must equal weight's size (", weight.numel(), ")");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "rms_norm: x and weight must be contiguous");
}

void rms_norm_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() && out.is_contiguous(),
              "rms_norm: out must be a contiguous tensor of x's shape and dtype");
  const int64_t hidden = x.size(-1);
  const int64_t rows = x.numel() / hidden;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + r * hidden;
        const float inv = rms_inverse(sum_of_squares(row, hidden), hidden, static_cast<float>(eps));
        scalar_t* dst = op + r * hidden;
        for (int64_t i = 0; i < hidden; ++i) dst[i] = rms_scale(row[i], inv, wp[i]);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mistral_grpc, CPU, m) { m.impl("rms_norm", &rms_norm_cpu); }

}  // namespace mistral_grpc
