// read_bandwidth on CPU, a benchmark-only op: how fast the linear kernels' own load loop streams
// memory, the ceiling their weight streams are measured against (benchmarks/bench_linear.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>

#include "common/linear_kernels.h"
#include "ops.h"

namespace mistral_grpc {
namespace {

using namespace linear;

// Best GB/s over `repeats` timed reads of the whole buffer, split across the intra-op threads as
// the linear ops split a weight, through the same load loop (fp32 kernel set).
double read_bandwidth_cpu(const at::Tensor& buffer, int64_t repeats) {
  check_read_bandwidth_args(buffer, repeats);
  const int64_t lines = buffer.nbytes() / kStepBytes;
  const auto* data = static_cast<const uint8_t*>(buffer.const_data_ptr());
  const ReadLinesFn read = kernels_for(WeightDtype::kFloat32).read_lines;
  const int64_t grain = kMinBytesPerThread / kStepBytes;
  std::atomic<float> sink{0.f};
  double best_seconds = 0.;
  for (int64_t r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    at::parallel_for(0, lines, grain, [&](int64_t begin, int64_t end) {
      sink.store(read(data + begin * kStepBytes, end - begin), std::memory_order_relaxed);
    });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best_seconds = r == 0 ? seconds : std::min(best_seconds, seconds);
  }
  return static_cast<double>(lines * kStepBytes) / best_seconds / 1e9;
}

}  // namespace

TORCH_LIBRARY_IMPL(mistral_grpc, CPU, m) { m.impl("read_bandwidth", &read_bandwidth_cpu); }

}  // namespace mistral_grpc
