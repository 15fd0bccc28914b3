// The quantized linear kernels for AVX2 CPUs: a 16-row q line is two ymm (rows 0..7, 8..15);
// vpmaddubsw multiplies unsigned bytes by signed ones into int16 pairs, which vpmaddwd sums into
// each row's int32. An int8 q (up to 255) times 127, twice, would saturate an int16, so int8 lines
// go through their signed value q - 128 (|q - 128| times x with q - 128's sign) and block() adds
// the 128 * sum(x_q) this leaves out.
#include "cpu/quant_kernels.h"

#if MG_LINEAR_X86_KERNELS

namespace mistral_grpc::linear {

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

struct Halves {
  __m256i lo, hi;  // rows 0..7, 8..15
};

struct FHalves {
  __m256 lo, hi;
};

struct Avx2 {
  using IAcc = Halves;
  using FAcc = FHalves;
  struct Params {
    FHalves scale, zero;
  };
  // int4: `magnitude` holds the low nibbles and `sign` the high ones; int8: |q - 128| and q - 128.
  struct Line {
    Halves magnitude, sign;
  };
  // 16 ymm registers: 2 IAcc + FAcc pairs (4 registers each) and the line's 4.
  static constexpr int kStreams = 2;
  static constexpr int kRegisters = 2;
  static constexpr int kInt4Registers = kRegisters;

  static IAcc izero() { return {.lo = _mm256_setzero_si256(), .hi = _mm256_setzero_si256()}; }
  static FAcc fzero() { return {.lo = _mm256_setzero_ps(), .hi = _mm256_setzero_ps()}; }

  template <int kBits>
  static Line line(const uint8_t* q) {
    const auto* halves = reinterpret_cast<const __m256i*>(q);
    const __m256i lo = _mm256_loadu_si256(halves), hi = _mm256_loadu_si256(halves + 1);
    if constexpr (kBits == 8) {
      const __m256i offset = _mm256_set1_epi8(static_cast<char>(0x80));
      const __m256i signed_lo = _mm256_xor_si256(lo, offset), signed_hi = _mm256_xor_si256(hi, offset);
      return {.magnitude = {.lo = _mm256_abs_epi8(signed_lo), .hi = _mm256_abs_epi8(signed_hi)},
              .sign = {.lo = signed_lo, .hi = signed_hi}};
    } else {
      const __m256i nibble = _mm256_set1_epi8(0x0f);
      return {.magnitude = {.lo = _mm256_and_si256(lo, nibble), .hi = _mm256_and_si256(hi, nibble)},
              .sign = {.lo = _mm256_and_si256(_mm256_srli_epi16(lo, 4), nibble),
                       .hi = _mm256_and_si256(_mm256_srli_epi16(hi, 4), nibble)}};
    }
  }

  static __m256i broadcast4(const int8_t* x) {
    int32_t four;
    std::memcpy(&four, x, sizeof four);
    return _mm256_set1_epi32(four);
  }

  // int16 pairs of one half -> its rows' int32 sums.
  static __m256i add_pairs(__m256i acc, __m256i pairs) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }

  template <int kBits>
  static IAcc dot(IAcc acc, const Line& w, const int8_t* x) {
    const __m256i x4 = broadcast4(x);
    if constexpr (kBits == 8) {
      return {.lo = add_pairs(acc.lo, _mm256_maddubs_epi16(w.magnitude.lo, _mm256_sign_epi8(x4, w.sign.lo))),
              .hi = add_pairs(acc.hi, _mm256_maddubs_epi16(w.magnitude.hi, _mm256_sign_epi8(x4, w.sign.hi)))};
    } else {
      const __m256i x_high = broadcast4(x + 4);
      return {.lo = add_pairs(acc.lo, _mm256_add_epi16(_mm256_maddubs_epi16(w.magnitude.lo, x4),
                                                       _mm256_maddubs_epi16(w.sign.lo, x_high))),
              .hi = add_pairs(acc.hi, _mm256_add_epi16(_mm256_maddubs_epi16(w.magnitude.hi, x4),
                                                       _mm256_maddubs_epi16(w.sign.hi, x_high)))};
    }
  }

  template <int kBits>
  static FAcc block(FAcc t, IAcc acc, float d, int32_t x_sum) {
    if constexpr (kBits == 8) {
      const __m256i offset = _mm256_set1_epi32(quant::kInt8Zero * x_sum);
      acc = {.lo = _mm256_add_epi32(acc.lo, offset), .hi = _mm256_add_epi32(acc.hi, offset)};
    }
    const __m256 dv = _mm256_set1_ps(d);
    return {.lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc.lo), dv, t.lo),
            .hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc.hi), dv, t.hi)};
  }

  template <int kBits>
  static Params params(const uint8_t* line) {
    const auto* gp = reinterpret_cast<const quant::GroupParams*>(line);
    const __m128i scales_lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(gp->scale));
    const __m128i scales_hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(gp->scale + 8));
    const __m128i zeros = _mm_loadu_si128(reinterpret_cast<const __m128i*>(gp->zero));
    const __m256 step = _mm256_set1_ps(quant::zero_unit(kBits));
    return {.scale = {.lo = _mm256_cvtph_ps(scales_lo), .hi = _mm256_cvtph_ps(scales_hi)},
            .zero = {.lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(zeros)), step),
                     .hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(zeros, 8))), step)}};
  }

  static void finish(float* res, FAcc t, const Params& params, float x_group) {
    const __m256 xg = _mm256_set1_ps(x_group);
    const __m256 centred_lo = _mm256_fnmadd_ps(params.zero.lo, xg, t.lo);
    const __m256 centred_hi = _mm256_fnmadd_ps(params.zero.hi, xg, t.hi);
    _mm256_storeu_ps(res, _mm256_fmadd_ps(params.scale.lo, centred_lo, _mm256_loadu_ps(res)));
    _mm256_storeu_ps(res + 8, _mm256_fmadd_ps(params.scale.hi, centred_hi, _mm256_loadu_ps(res + 8)));
  }
};

#include "cpu/quant_kernel_body.h"

}  // namespace avx2
#pragma GCC pop_options

const QuantKernelSet kQuantAvx2 = avx2::quant_kernel_set<avx2::Avx2>();

}  // namespace mistral_grpc::linear

#endif  // MG_LINEAR_X86_KERNELS
