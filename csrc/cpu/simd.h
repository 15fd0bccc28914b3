// 16-lane fp32 vectors for the CPU kernels, written once with GCC vector extensions.
//
// The extension is built for baseline x86-64 so it runs anywhere. A hot function marked
// MG_CPU_CLONES is compiled three times (AVX-512, AVX2+FMA+F16C, baseline) and the loader picks the
// best one for the running CPU (an ifunc). Everything here is always_inline so it is compiled inside
// each clone with that clone's instruction set: a 16-lane vector is one zmm register on AVX-512,
// two ymm on AVX2, four xmm on the baseline.
//
// Storage dtypes are widened to fp32 on load and rounded (to nearest even) on store, so every
// kernel accumulates in fp32 whatever it reads.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

// GCC warns that 64-byte vectors change the ABI of functions built without AVX-512; these helpers
// are always inlined, so no such call crosses a function boundary. (Vector parameters are taken by
// const reference: GCC still prints a note for by-value ones whatever this pragma says.)
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MG_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MG_CPU_CLONES
#endif
#define MG_ALWAYS_INLINE [[gnu::always_inline]] inline
// For lambdas in hot loops, which GCC may otherwise outline and compile for the baseline only:
// [&](int64_t i) MG_ALWAYS_INLINE_LAMBDA { ... }
#define MG_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))

namespace mistral_grpc::cpu {

constexpr int64_t kLanes = 16;

using vfloat = float __attribute__((vector_size(64)));
using vint = int32_t __attribute__((vector_size(64)));
using vuint = uint32_t __attribute__((vector_size(64)));
using vbits16 = uint16_t __attribute__((vector_size(32)));
using vfp16 = _Float16 __attribute__((vector_size(32)));

static_assert(sizeof(c10::Half) == sizeof(_Float16) && sizeof(c10::BFloat16) == sizeof(uint16_t));

constexpr int64_t round_up_to_lanes(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

template <typename To, typename From>
MG_ALWAYS_INLINE To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// Written as a shuffle of lane 0: GCC builds `vfloat{} + x` with a scalar add and, in some loops,
// `x - vfloat{}` one lane at a time; this form is always a single broadcast.
MG_ALWAYS_INLINE vfloat splat(float x) {
  const vfloat v{x};
  return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
}

MG_ALWAYS_INLINE vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

MG_ALWAYS_INLINE vfloat load(const c10::BFloat16* p) {
  vbits16 bits;
  std::memcpy(&bits, p, sizeof(bits));
  return bit_cast<vfloat>(__builtin_convertvector(bits, vuint) << 16);
}

MG_ALWAYS_INLINE vfloat load(const c10::Half* p) {
  vfp16 h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, vfloat);
}

MG_ALWAYS_INLINE void store(float* p, const vfloat& v) { std::memcpy(p, &v, sizeof(v)); }

// Round to nearest even, NaN to the canonical quiet NaN: what c10::BFloat16(float) does. The
// result is the bf16 in the high half of each 32-bit lane, the low half zero.
MG_ALWAYS_INLINE vuint round_bf16_high(const vfloat& v) {
  const vuint u = bit_cast<vuint>(v);
  const vuint rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  return v != v ? vuint{} + 0x7FC00000u : rounded;
}

MG_ALWAYS_INLINE vbits16 to_bf16_bits(const vfloat& v) {
  return __builtin_convertvector(round_bf16_high(v) >> 16, vbits16);
}

MG_ALWAYS_INLINE void store(c10::BFloat16* p, const vfloat& v) {
  const vbits16 bits = to_bf16_bits(v);
  std::memcpy(p, &bits, sizeof(bits));
}

MG_ALWAYS_INLINE void store(c10::Half* p, const vfloat& v) {
  const vfp16 h = __builtin_convertvector(v, vfp16);
  std::memcpy(p, &h, sizeof(h));
}

// The first n (< kLanes) elements; the other lanes read as zero.
template <typename T>
MG_ALWAYS_INLINE vfloat load_partial(const T* p, int64_t n) {
  T staged[kLanes];
  std::memset(static_cast<void*>(staged), 0, sizeof(staged));
  std::memcpy(static_cast<void*>(staged), p, n * sizeof(T));
  return load(staged);
}

template <typename T>
MG_ALWAYS_INLINE void store_partial(T* p, const vfloat& v, int64_t n) {
  T staged[kLanes];
  store(staged, v);
  std::memcpy(static_cast<void*>(p), staged, n * sizeof(T));
}

// n <= kLanes elements: the loops below step through rows kLanes at a time, the last step partial.
template <typename T>
MG_ALWAYS_INLINE vfloat load_n(const T* p, int64_t n) {
  return n == kLanes ? load(p) : load_partial(p, n);
}

template <typename T>
MG_ALWAYS_INLINE void store_n(T* p, const vfloat& v, int64_t n) {
  if (n == kLanes) {
    store(p, v);
  } else {
    store_partial(p, v, n);
  }
}

// Calls body(offset, n) for each kLanes-wide step over [0, size).
template <typename Body>
MG_ALWAYS_INLINE void for_each_lane_step(int64_t size, Body body) {
  for (int64_t i = 0; i < size; i += kLanes) body(i, size - i < kLanes ? size - i : kLanes);
}

// Rounds to T's precision and back: the intermediate casts of Hugging Face's bf16/fp16 math.
template <typename T>
struct RoundTo {
  MG_ALWAYS_INLINE vfloat operator()(const vfloat& v) const {
    if constexpr (std::is_same_v<T, float>) {
      return v;
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return bit_cast<vfloat>(round_bf16_high(v));  // in registers: no store and reload
    } else {
      T staged[kLanes];
      store(staged, v);
      return load(staged);
    }
  }
};

MG_ALWAYS_INLINE vfloat max(const vfloat& a, const vfloat& b) { return a > b ? a : b; }

MG_ALWAYS_INLINE float reduce_sum(const vfloat& v) {
  float sum = 0.f;
  for (int i = 0; i < kLanes; ++i) sum += v[i];
  return sum;
}

// The sums of four vectors, in lanes 0, 4, 8 and 12: a transpose-and-add tree of 13 operations
// where four separate reductions would take 32.
MG_ALWAYS_INLINE vfloat reduce_sum4(const vfloat& a0, const vfloat& a1, const vfloat& a2, const vfloat& a3) {
  const vfloat s01 = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                     __builtin_shufflevector(a0, a1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const vfloat s23 = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                     __builtin_shufflevector(a2, a3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const vfloat quads = __builtin_shufflevector(s01, s23, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                       __builtin_shufflevector(s01, s23, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const vfloat pairs =
      quads + __builtin_shufflevector(quads, quads, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  return pairs + __builtin_shufflevector(pairs, pairs, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
}

// 2^x with a relative error below 2e-7: split x = n + f (n integer, |f| <= 1/2), a degree-6
// polynomial for 2^f, n added to the exponent bits. Inputs below -126 give exactly 0 (so exp2(-inf)
// is 0 and masked scores vanish); inputs are clamped at 127 on the way up.
MG_ALWAYS_INLINE vfloat exp2(const vfloat& x) {
  const vfloat clamped = max(x, splat(-127.f)) < 127.f ? max(x, splat(-127.f)) : splat(127.f);
  // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
  const vfloat shifter = splat(12582912.f);
  const vfloat shifted = clamped + shifter;
  const vfloat n = shifted - shifter;
  const vfloat f = clamped - n;
  const vint exponent = (bit_cast<vint>(shifted) - bit_cast<vint>(shifter)) << 23;
  vfloat p = splat(1.5403530393381606e-4f);
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.f;
  const vfloat scaled = bit_cast<vfloat>(bit_cast<vint>(p) + exponent);
  return x < -126.f ? vfloat{} : scaled;
}

struct Exp {
  MG_ALWAYS_INLINE vfloat operator()(const vfloat& x) const { return exp2(x * 1.4426950408889634f); }
};

struct Exp2 {
  MG_ALWAYS_INLINE vfloat operator()(const vfloat& x) const { return exp2(x); }
};

}  // namespace mistral_grpc::cpu
