// RMSNorm kernels on CPU: rows split across threads, each row reduced and scaled in fp32 vectors.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common/dispatch.h"
#include "common/norm.h"
#include "cpu/ops_cpu.h"
#include "cpu/simd.h"
#include "ops.h"

namespace mistral_grpc {
namespace {

using cpu::vfloat;

// Rows a thread takes at a time: each row is a whole hidden vector (thousands of elements).
constexpr int64_t kRowGrain = 16;

template <typename T>
MG_ALWAYS_INLINE void normalize_row(T* out, const T* row, const T* weight, int64_t hidden, float eps) {
  vfloat sum_sq{};
  cpu::for_each_lane_step(hidden, [&](int64_t i, int64_t n) {
    const vfloat v = cpu::load_n(row + i, n);
    sum_sq += v * v;
  });
  const float inv = rms_inverse(cpu::reduce_sum(sum_sq), hidden, eps);
  cpu::for_each_lane_step(hidden, [&](int64_t i, int64_t n) {
    cpu::store_n(out + i, rms_scale(cpu::load_n(row + i, n), inv, cpu::load_n(weight + i, n), cpu::RoundTo<T>{}),
                 n);
  });
}

template <typename T>
MG_CPU_CLONES void rms_norm_rows(T* out, const T* x, const T* weight, int64_t begin, int64_t end, int64_t hidden,
                                 float eps) {
  for (int64_t r = begin; r < end; ++r) normalize_row(out + r * hidden, x + r * hidden, weight, hidden, eps);
}

// residual += x, then x = rms_norm(residual): the sum is written to residual first and re-read.
template <typename T>
MG_CPU_CLONES void fused_add_rms_norm_rows(T* x, T* residual, const T* weight, int64_t begin, int64_t end,
                                           int64_t hidden, float eps) {
  for (int64_t r = begin; r < end; ++r) {
    T* x_row = x + r * hidden;
    T* res_row = residual + r * hidden;
    cpu::for_each_lane_step(hidden, [&](int64_t i, int64_t n) {
      const vfloat sum = residual_add(cpu::load_n(x_row + i, n), cpu::load_n(res_row + i, n), cpu::RoundTo<T>{});
      cpu::store_n(res_row + i, sum, n);
    });
    normalize_row(x_row, res_row, weight, hidden, eps);
  }
}

void rms_norm_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_args(out, x, weight);
  const int64_t hidden = x.size(-1);
  if (hidden == 0) return;
  const int64_t rows = x.numel() / hidden;
  MG_DISPATCH_FLOAT_TYPES(x.scalar_type(), "rms_norm_cpu", [&] {
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      rms_norm_rows(out.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                    weight.const_data_ptr<scalar_t>(), begin, end, hidden, static_cast<float>(eps));
    });
  });
}

}  // namespace

void fused_add_rms_norm_cpu(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_fused_add_rms_norm_args(x, residual, weight);
  const int64_t hidden = x.size(-1);
  if (hidden == 0) return;
  const int64_t rows = x.numel() / hidden;
  MG_DISPATCH_FLOAT_TYPES(x.scalar_type(), "fused_add_rms_norm_cpu", [&] {
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      fused_add_rms_norm_rows(x.mutable_data_ptr<scalar_t>(), residual.mutable_data_ptr<scalar_t>(),
                              weight.const_data_ptr<scalar_t>(), begin, end, hidden, static_cast<float>(eps));
    });
  });
}

TORCH_LIBRARY_IMPL(mistral_grpc, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cpu);
}

}  // namespace mistral_grpc
