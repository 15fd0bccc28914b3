// Lets one function body serve the CPU kernels (plain C++) and the CUDA kernels (nvcc), so the CPU
// tests exercise the exact math the GPU runs.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MG_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MG_HOST_DEVICE inline
#endif
