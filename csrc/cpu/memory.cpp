// The CPU's one allocator for memory that is streamed (the packed weights, the KV cache through
// python/mistral_grpc/memory.py, the benchmarks' buffers): zeroed, on 2 MiB pages where it can be.
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <cstdint>

#include "cpu/ops_cpu.h"

namespace mistral_grpc {

// Zeroed bytes, on 2 MiB pages where the kernel allows (transparent huge pages in "madvise" mode,
// the usual default) and the weight fills one, so streaming a weight costs one TLB miss per 2 MiB
// instead of per 4 KiB (a decode step reads every weight once). The mapping starts on a 2 MiB
// boundary and is advised before its first touch.
at::Tensor zeroed_bytes(int64_t bytes) {
#ifdef MADV_HUGEPAGE
  constexpr int64_t kHugePage = 2 << 20, kPage = 4096;
  if (bytes >= kHugePage) {
    const int64_t length = (bytes + kPage - 1) / kPage * kPage;
    const int64_t mapped = length + kHugePage;
    void* raw = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw != MAP_FAILED) {
      auto* base = static_cast<uint8_t*>(raw);
      uint8_t* start = base + (kHugePage - reinterpret_cast<uintptr_t>(base) % kHugePage) % kHugePage;
      if (start > base) munmap(base, start - base);
      if (start + length < base + mapped) munmap(start + length, base + mapped - (start + length));
      madvise(start, length, MADV_HUGEPAGE);  // advice only: without THP the pages stay 4 KiB
      return at::from_blob(start, {bytes}, [length](void* data) { munmap(data, length); },
                           at::TensorOptions().dtype(at::kByte));
    }
  }
#endif
  return at::zeros({bytes}, at::TensorOptions().dtype(at::kByte));
}

// No tensor arguments, so no backend to dispatch on.
TORCH_LIBRARY_IMPL(mistral_grpc, CompositeExplicitAutograd, m) {
  m.impl("zeroed_bytes", [](int64_t nbytes) {
    TORCH_CHECK(nbytes >= 0, "zeroed_bytes: nbytes must be >= 0, got ", nbytes);
    return zeroed_bytes(nbytes);
  });
}

}  // namespace mistral_grpc
