// The linear kernels for AVX-512 CPUs: a 16-output tile is one zmm accumulator, one 64-byte weight
// line per FMA. Two sets: AVX-512F (bf16 widened with shifts, as on AVX2) and AVX512_BF16, where
// one vdpbf16ps multiplies the packed (even, odd) pairs by the broadcast (x[2s], x[2s+1]) pair.
#include "common/linear_kernels.h"

#if MG_LINEAR_X86_KERNELS

namespace mistral_grpc::linear {

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
namespace avx512 {

struct VectorPart {
  using Acc = __m512;
  // 32 zmm registers: 24 accumulators (4 streams x 6 rows, or x 3 rows x gate/up), plus the
  // weight lines and broadcasts.
  static constexpr int kStreams = 4;
  static constexpr int kAccumulators = 24;
  static Acc zero() { return _mm512_setzero_ps(); }
  static Acc add(Acc a, Acc b) { return _mm512_add_ps(a, b); }
  static Acc load(const float* src) { return _mm512_loadu_ps(src); }
  static void store(Acc a, float* dst) { _mm512_storeu_ps(dst, a); }
};

struct Fp32 : Fp32Operands, VectorPart {
  static void step(Acc& acc, const uint8_t* line, XVal x) {
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(line), _mm512_set1_ps(x), acc);
  }
};

struct Bf16 : Bf16Operands, VectorPart {
  static void step(Acc& acc, const uint8_t* line, XVal x) {
    const __m512i pairs = _mm512_loadu_si512(line);
    // (maskz: the plain _mm512_slli_epi32 trips a false -Wmaybe-uninitialized in GCC 12)
    const __m512 even = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xffff, pairs, 16));
    const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(0xffff0000u)));
    acc = _mm512_fmadd_ps(odd, _mm512_set1_ps(high(x)), _mm512_fmadd_ps(even, _mm512_set1_ps(low(x)), acc));
  }
};

#include "common/linear_kernel_body.h"

}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")
namespace avx512_bf16 {

struct Bf16Dot : Bf16Operands, avx512::VectorPart {
  static void step(Acc& acc, const uint8_t* line, XVal x) {
    acc = _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(_mm512_loadu_si512(line)),
                           reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(x))));
  }
};

#include "common/linear_kernel_body.h"

}  // namespace avx512_bf16
#pragma GCC pop_options

const KernelSet kAvx512Fp32 = avx512::kernel_set<avx512::Fp32>();
const KernelSet kAvx512Bf16 = avx512::kernel_set<avx512::Bf16>();
const KernelSet kAvx512Bf16Dot = avx512_bf16::kernel_set<avx512_bf16::Bf16Dot>();

}  // namespace mistral_grpc::linear

#endif  // MG_LINEAR_X86_KERNELS
