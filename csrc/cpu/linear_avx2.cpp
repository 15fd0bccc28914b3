// The linear kernels for AVX2 + FMA CPUs: a 16-output tile is two ymm accumulators; bf16 weights
// are widened to fp32 with shifts (the low half of each packed pair is the even K column).
#include "common/linear_kernels.h"

#if MG_LINEAR_X86_KERNELS
#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace mistral_grpc::linear {
namespace avx2 {

struct Halves {
  __m256 lo, hi;  // outputs 0..7, 8..15 of the tile
};

struct VectorPart {
  using Acc = Halves;
  // 16 ymm registers: 6 accumulators of 2 halves (2 streams x 3 rows, or x 1 row x gate/up),
  // plus the weight lines and broadcasts.
  static constexpr int kStreams = 2;
  static constexpr int kAccumulators = 6;
  static Acc zero() { return {.lo = _mm256_setzero_ps(), .hi = _mm256_setzero_ps()}; }
  static Acc add(Acc a, Acc b) { return {.lo = _mm256_add_ps(a.lo, b.lo), .hi = _mm256_add_ps(a.hi, b.hi)}; }
  static Acc load(const float* src) { return {.lo = _mm256_loadu_ps(src), .hi = _mm256_loadu_ps(src + 8)}; }
  static void store(Acc a, float* dst) {
    _mm256_storeu_ps(dst, a.lo);
    _mm256_storeu_ps(dst + 8, a.hi);
  }
};

struct Fp32 : Fp32Operands, VectorPart {
  static void step(Acc& acc, const uint8_t* line, XVal x) {
    const auto* w = reinterpret_cast<const float*>(line);
    const __m256 xv = _mm256_set1_ps(x);
    acc.lo = _mm256_fmadd_ps(_mm256_loadu_ps(w), xv, acc.lo);
    acc.hi = _mm256_fmadd_ps(_mm256_loadu_ps(w + 8), xv, acc.hi);
  }
};

struct Bf16 : Bf16Operands, VectorPart {
  static __m256 fma_pairs(__m256i pairs, __m256 x_even, __m256 x_odd, __m256 acc) {
    const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
    const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(0xffff0000u)));
    return _mm256_fmadd_ps(odd, x_odd, _mm256_fmadd_ps(even, x_even, acc));
  }
  static void step(Acc& acc, const uint8_t* line, XVal x) {
    const __m256 x_even = _mm256_set1_ps(low(x)), x_odd = _mm256_set1_ps(high(x));
    const auto* w = reinterpret_cast<const __m256i*>(line);
    acc.lo = fma_pairs(_mm256_loadu_si256(w), x_even, x_odd, acc.lo);
    acc.hi = fma_pairs(_mm256_loadu_si256(w + 1), x_even, x_odd, acc.hi);
  }
};

#include "common/linear_kernel_body.h"

}  // namespace avx2

const KernelSet kAvx2Fp32 = avx2::kernel_set<avx2::Fp32>();
const KernelSet kAvx2Bf16 = avx2::kernel_set<avx2::Bf16>();

}  // namespace mistral_grpc::linear

#pragma GCC pop_options
#endif  // MG_LINEAR_X86_KERNELS
