// silu_and_mul on CPU: out = silu(gate) * up over [rows, 2F] inputs, split across threads by row and
// column range so a single decode row still spreads over the cores.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

#include "common/activation.h"
#include "common/dispatch.h"
#include "cpu/simd.h"
#include "ops.h"

namespace mistral_grpc {
namespace {

// Columns of one row a work item covers: large enough to amortise the scheduling.
constexpr int64_t kColumnsPerItem = 2048;

template <typename T>
MG_CPU_CLONES void silu_and_mul_items(T* out, const T* gate_up, int64_t begin, int64_t end, int64_t width,
                                      int64_t items_per_row) {
  for (int64_t item = begin; item < end; ++item) {
    const int64_t row = item / items_per_row;
    const int64_t col = item % items_per_row * kColumnsPerItem;
    const T* gate = gate_up + row * 2 * width + col;
    const T* up = gate + width;
    T* dst = out + row * width + col;
    cpu::for_each_lane_step(std::min(kColumnsPerItem, width - col), [&](int64_t i, int64_t n) {
      const cpu::vfloat y =
          silu_and_mul(cpu::load_n(gate + i, n), cpu::load_n(up + i, n), cpu::Exp{}, cpu::RoundTo<T>{});
      cpu::store_n(dst + i, y, n);
    });
  }
}

void silu_and_mul_cpu(at::Tensor& out, const at::Tensor& gate_up) {
  check_silu_and_mul_args(out, gate_up);
  const int64_t width = out.size(-1);
  if (width == 0 || out.numel() == 0) return;
  const int64_t rows = out.numel() / width;
  const int64_t items_per_row = (width + kColumnsPerItem - 1) / kColumnsPerItem;
  MG_DISPATCH_FLOAT_TYPES(out.scalar_type(), "silu_and_mul_cpu", [&] {
    at::parallel_for(0, rows * items_per_row, 1, [&](int64_t begin, int64_t end) {
      silu_and_mul_items(out.mutable_data_ptr<scalar_t>(), gate_up.const_data_ptr<scalar_t>(), begin, end, width,
                         items_per_row);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mistral_grpc, CPU, m) { m.impl("silu_and_mul", &silu_and_mul_cpu); }

}  // namespace mistral_grpc
