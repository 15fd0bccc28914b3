// Lets one function body serve the CPU kernels (plain C++) and the CUDA kernels (nvcc), so the CPU
// tests exercise the exact math the GPU runs.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MG_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined: the CPU kernels compile this math into each instruction-set clone (cpu/simd.h).
#define MG_HOST_DEVICE __attribute__((always_inline)) inline
#else
#define MG_HOST_DEVICE inline
#endif

#if !defined(__CUDACC__) && defined(__GNUC__) && !defined(__clang__)
// The CPU kernels instantiate the shared math with 64-byte vectors (cpu/simd.h) inside always-inline
// code; GCC's warning that such values change the ABI of non-AVX-512 calls does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

// Unrolls the next loop under nvcc (fixed trip counts: the GEMV's rows and values per word); the CPU
// compilers unroll on their own.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MG_UNROLL _Pragma("unroll")
#else
#define MG_UNROLL
#endif
