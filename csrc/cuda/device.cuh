// Device-side helpers the CUDA kernels share: the per-element functors the common math takes
// (rounding to the storage dtype, exponentials) and warp/block reductions.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace mistral_grpc::cuda {

constexpr int kWarpSize = 32;

// Rounds an fp32 value to T's precision and back: Hugging Face's intermediate casts.
template <typename T>
struct RoundTo {
  __device__ __forceinline__ float operator()(float v) const { return static_cast<float>(static_cast<T>(v)); }
};

struct Exp {
  __device__ __forceinline__ float operator()(float x) const { return __expf(x); }
};

struct Exp2 {
  __device__ __forceinline__ float operator()(float x) const { return exp2f(x); }
};

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block, returned to every thread. `partial` holds one float per warp; blockDim.x must
// be a multiple of the warp size.
__device__ __forceinline__ float block_sum(float v, float* partial) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  v = warp_sum(v);
  __syncthreads();  // `partial` may still be read from a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < num_warps; ++w) total += partial[w];
  return total;
}

// N consecutive elements moved as one load/store (16 bytes for N = 16 / sizeof(T)).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// How many elements of T one 16-byte access moves.
template <typename T>
constexpr int kPackElems = 16 / sizeof(T);

// Calls launch(std::integral_constant<int, N>) with N = kPackElems<T> when rows of `row_elems`
// elements from every pointer in `bases` can be moved in 16-byte packs, else with N = 1.
template <typename T, typename Launch>
void with_pack_width(std::initializer_list<const void*> bases, int64_t row_elems, Launch launch) {
  bool packed = row_elems % kPackElems<T> == 0;
  for (const void* base : bases) packed = packed && reinterpret_cast<uintptr_t>(base) % 16 == 0;
  if (packed) {
    launch(std::integral_constant<int, kPackElems<T>>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

}  // namespace mistral_grpc::cuda
