// The quantized linear kernels for AVX-512 VNNI CPUs: a 16-row q line is one zmm, and one vpdpbusd
// multiplies its unsigned q bytes by 4 broadcast int8 activations and adds them into 16 int32 sums.
#include "cpu/quant_kernels.h"

#if MG_LINEAR_X86_KERNELS

namespace mistral_grpc::linear {

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
namespace avx512_vnni {

struct Vnni {
  using IAcc = __m512i;
  using FAcc = __m512;
  struct Params {
    __m512 scale, zero;
  };
  struct Line {
    __m512i low, high;  // int4: K offsets 0..3 and 4..7 of each row; int8: low only
  };
  // 32 zmm registers: 12 IAcc + FAcc pairs (4 streams x 3 rows, or x 1 row x gate/up), plus the q lines,
  // the broadcasts and the nibble mask.
  static constexpr int kStreams = 4;
  static constexpr int kRegisters = 12;
  // An int4 line is two zmm plus the nibble mask: 12 rows in one stream spill, and 8 (linear) / 4 (gate_up)
  // run prefill about 1.7x faster.
  static constexpr int kInt4Registers = 8;
  // (The maskz forms with every lane set: the plain conversions trip a false -Wmaybe-uninitialized in GCC 12.)
  static constexpr __mmask16 kAll = 0xffff;

  static IAcc izero() { return _mm512_setzero_si512(); }
  static FAcc fzero() { return _mm512_setzero_ps(); }

  template <int kBits>
  static Line line(const uint8_t* q) {
    const __m512i bytes = _mm512_loadu_si512(q);
    if constexpr (kBits == 8) {
      return {.low = bytes, .high = bytes};
    } else {
      const __m512i nibble = _mm512_set1_epi8(0x0f);
      return {.low = _mm512_and_si512(bytes, nibble), .high = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble)};
    }
  }

  static __m512i broadcast4(const int8_t* x) {
    int32_t four;
    std::memcpy(&four, x, sizeof four);
    return _mm512_set1_epi32(four);
  }

  template <int kBits>
  static IAcc dot(IAcc acc, const Line& w, const int8_t* x) {
    acc = _mm512_dpbusd_epi32(acc, w.low, broadcast4(x));
    if constexpr (kBits == 4) acc = _mm512_dpbusd_epi32(acc, w.high, broadcast4(x + 4));
    return acc;
  }

  template <int kBits>
  static FAcc block(FAcc t, IAcc acc, float d, int32_t) {
    return _mm512_fmadd_ps(_mm512_maskz_cvtepi32_ps(kAll, acc), _mm512_set1_ps(d), t);
  }

  template <int kBits>
  static Params params(const uint8_t* line) {
    const auto* gp = reinterpret_cast<const quant::GroupParams*>(line);
    const __m512i zeros = _mm512_maskz_cvtepu8_epi32(kAll, _mm_loadu_si128(reinterpret_cast<const __m128i*>(gp->zero)));
    return {.scale = _mm512_maskz_cvtph_ps(kAll, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gp->scale))),
            .zero = _mm512_mul_ps(_mm512_maskz_cvtepi32_ps(kAll, zeros), _mm512_set1_ps(quant::zero_unit(kBits)))};
  }

  static void finish(float* res, FAcc t, const Params& params, float x_group) {
    const __m512 centred = _mm512_fnmadd_ps(params.zero, _mm512_set1_ps(x_group), t);
    _mm512_storeu_ps(res, _mm512_fmadd_ps(params.scale, centred, _mm512_loadu_ps(res)));
  }
};

#include "cpu/quant_kernel_body.h"

}  // namespace avx512_vnni
#pragma GCC pop_options

const QuantKernelSet kQuantAvx512Vnni = avx512_vnni::quant_kernel_set<avx512_vnni::Vnni>();

}  // namespace mistral_grpc::linear

#endif  // MG_LINEAR_X86_KERNELS
