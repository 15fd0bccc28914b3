// paged_attention on CUDA: one block per (query token, query head), so prefill, chunked prefill and
// decode rows share one launch. The block's warps take interleaved keys of the query's visible
// range; within a warp each lane holds a slice of head_dim (packed loads where aligned), the score
// is a warp sum, and each warp keeps its own online softmax in fp32. The warps' partial states are
// merged at the end. Masking rule and softmax math are shared with the CPU in common/attention.h.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "common/attention.h"
#include "common/cache.h"
#include "common/dispatch.h"
#include "cuda/device.cuh"
#include "ops.h"

namespace mistral_grpc {
namespace {

using cuda::Pack;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * cuda::kWarpSize;
constexpr int kMaxHeadDim = 8 * cuda::kWarpSize;  // eight elements per lane at most

struct AttentionShape {
  int64_t out_token_stride, q_token_stride, num_blocks, sliding_window;
  int num_seqs, num_kv_heads, group, head_dim, block_size, max_blocks;
  float scale_log2;  // softmax scale times log2(e): scores live in the log2 domain
  bool packed;       // q and cache rows can be read one Pack<T, EPT> per lane
};

// Lane `lane` holds elements [lane * EPT, lane * EPT + EPT) of a row, zeros past head_dim.
template <typename T, int EPT>
__device__ __forceinline__ void load_lane(const T* row, int lane, int head_dim, bool packed, float (&dst)[EPT]) {
  const int d0 = lane * EPT;
  if (packed && d0 < head_dim) {  // packed implies head_dim % EPT == 0: a lane's slice is whole
    const Pack<T, EPT> pack = *reinterpret_cast<const Pack<T, EPT>*>(row + d0);
#pragma unroll
    for (int e = 0; e < EPT; ++e) dst[e] = static_cast<float>(pack.v[e]);
    return;
  }
#pragma unroll
  for (int e = 0; e < EPT; ++e) dst[e] = d0 + e < head_dim ? static_cast<float>(row[d0 + e]) : 0.f;
}

// The sequence owning q row `token`: the last b with query_start_loc[b] <= token (sequences with no
// queries this step share their start with the next one). num_seqs when no sequence owns it.
__device__ __forceinline__ int find_sequence(const int32_t* query_start_loc, int num_seqs, int64_t token) {
  int lo = 0, hi = num_seqs;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (query_start_loc[mid] <= token) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

template <typename T>
__device__ __forceinline__ void fill_nan(T* dst, int head_dim) {
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) dst[d] = static_cast<T>(NAN);
}

// Metadata the host could not check (it lives on the device) is bounded here instead: a row whose
// sequence is inconsistent or whose block table points outside the cache comes out NaN.
template <typename T, int EPT>
__global__ void __launch_bounds__(kThreads)
    paged_attention_kernel(T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ k_cache,
                           const T* __restrict__ v_cache, const int32_t* __restrict__ block_tables,
                           const int32_t* __restrict__ seq_lens, const int32_t* __restrict__ query_start_loc,
                           AttentionShape s) {
  __shared__ float warp_max[kWarps], warp_sum[kWarps];
  __shared__ float warp_acc[kWarps][kMaxHeadDim];
  const int64_t token = blockIdx.x;
  const int head = blockIdx.y, warp = threadIdx.x / cuda::kWarpSize, lane = threadIdx.x % cuda::kWarpSize;

  const int b = find_sequence(query_start_loc, s.num_seqs, token);
  const int64_t q_start = query_start_loc[b < s.num_seqs ? b : 0];
  if (b >= s.num_seqs || token < q_start) return;  // a padding row no sequence owns: left as it is
  const int64_t q_len = query_start_loc[b + 1] - q_start, seq_len = seq_lens[b];
  const int64_t i = token - q_start;
  T* dst = out + token * s.out_token_stride + static_cast<int64_t>(head) * s.head_dim;
  if (i >= q_len || q_len > seq_len || seq_len > static_cast<int64_t>(s.max_blocks) * s.block_size) {
    fill_nan(dst, s.head_dim);
    return;
  }
  const int64_t pos = query_position(seq_len, q_len, i);
  const int kv_head = head / s.group;
  const int32_t* table = block_tables + static_cast<int64_t>(b) * s.max_blocks;

  float query[EPT];
  load_lane<T, EPT>(q + token * s.q_token_stride + static_cast<int64_t>(head) * s.head_dim, lane, s.head_dim,
                    s.packed, query);
#pragma unroll
  for (int e = 0; e < EPT; ++e) query[e] *= s.scale_log2;

  float acc[EPT] = {};
  float running_max = -INFINITY, running_sum = 0.f;
  bool bad_block = false;
  for (int64_t key = first_visible_key(pos, s.sliding_window) + warp; key <= pos; key += kWarps) {
    const int32_t block = table[key / s.block_size];
    if (block < 0 || block >= s.num_blocks) {  // the same key across the warp: a uniform exit
      bad_block = true;
      break;
    }
    const int64_t offset = cache_offset(static_cast<int64_t>(block) * s.block_size + key % s.block_size, kv_head,
                                        s.num_kv_heads, s.head_dim);
    float k[EPT], v[EPT];
    load_lane<T, EPT>(k_cache + offset, lane, s.head_dim, s.packed, k);
    load_lane<T, EPT>(v_cache + offset, lane, s.head_dim, s.packed, v);
    float dot = 0.f;
#pragma unroll
    for (int e = 0; e < EPT; ++e) dot += query[e] * k[e];
    const float score = cuda::warp_sum(dot);
    float base;
    const float rescale = online_softmax_update(running_max, score, base, cuda::Exp2{});
    const float prob = exp2f(score - base);
    running_sum = running_sum * rescale + prob;
#pragma unroll
    for (int e = 0; e < EPT; ++e) acc[e] = acc[e] * rescale + prob * v[e];
  }
  if (__syncthreads_or(bad_block)) {
    fill_nan(dst, s.head_dim);
    return;
  }

  if (lane == 0) {
    warp_max[warp] = running_max;
    warp_sum[warp] = running_sum;
  }
#pragma unroll
  for (int e = 0; e < EPT; ++e) {
    if (lane * EPT + e < s.head_dim) warp_acc[warp][lane * EPT + e] = acc[e];
  }
  __syncthreads();
  for (int d = threadIdx.x; d < s.head_dim; d += blockDim.x) {
    float merged_max = warp_max[0], sum = warp_sum[0], value = warp_acc[0][d];
    for (int w = 1; w < kWarps; ++w) {
      float weight_merged, weight_w;
      merged_max = merge_softmax_weights(merged_max, warp_max[w], weight_merged, weight_w, cuda::Exp2{});
      sum = sum * weight_merged + warp_sum[w] * weight_w;
      value = value * weight_merged + warp_acc[w][d] * weight_w;
    }
    dst[d] = static_cast<T>(sum > 0.f ? value / sum : 0.f);
  }
}

bool aligned_to(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

template <typename T, int EPT>
void launch(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
            AttentionShape shape, cudaStream_t stream) {
  const int64_t pack_bytes = EPT * sizeof(T);
  shape.packed = shape.head_dim % EPT == 0 && shape.q_token_stride % EPT == 0 && aligned_to(q.data_ptr(), pack_bytes) &&
                 aligned_to(k_cache.data_ptr(), pack_bytes) && aligned_to(v_cache.data_ptr(), pack_bytes);
  const dim3 grid(q.size(0), q.size(1));
  paged_attention_kernel<T, EPT><<<grid, kThreads, 0, stream>>>(
      out.mutable_data_ptr<T>(), q.const_data_ptr<T>(), k_cache.const_data_ptr<T>(), v_cache.const_data_ptr<T>(),
      block_tables.const_data_ptr<int32_t>(), seq_lens.const_data_ptr<int32_t>(),
      query_start_loc.const_data_ptr<int32_t>(), shape);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void paged_attention_cuda(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& block_tables, const at::Tensor& seq_lens,
                          const at::Tensor& query_start_loc, double scale, int64_t sliding_window) {
  check_paged_attention_args(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc);
  const int64_t head_dim = q.size(2);
  TORCH_CHECK(head_dim <= kMaxHeadDim, "paged_attention: the CUDA kernel takes head_dim up to ", kMaxHeadDim,
              ", got ", head_dim);
  const c10::cuda::CUDAGuard guard(q.device());
  if (q.size(0) == 0 || q.size(1) == 0 || head_dim == 0 || block_tables.size(0) == 0) return;
  const AttentionShape shape{.out_token_stride = out.stride(0),
                             .q_token_stride = q.stride(0),
                             .num_blocks = k_cache.size(0),
                             .sliding_window = sliding_window,
                             .num_seqs = static_cast<int>(block_tables.size(0)),
                             .num_kv_heads = static_cast<int>(k_cache.size(2)),
                             .group = static_cast<int>(q.size(1) / k_cache.size(2)),
                             .head_dim = static_cast<int>(head_dim),
                             .block_size = static_cast<int>(k_cache.size(1)),
                             .max_blocks = static_cast<int>(block_tables.size(1)),
                             .scale_log2 = static_cast<float>(scale) * kLog2e,
                             .packed = false};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Elements per lane: head_dim / 32 rounded up to a power of two, so a lane's slice can be one pack.
  const int64_t per_lane = (head_dim + cuda::kWarpSize - 1) / cuda::kWarpSize;
  MG_DISPATCH_FLOAT_TYPES(q.scalar_type(), "paged_attention_cuda", [&] {
    if (per_lane <= 1) {
      launch<scalar_t, 1>(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, shape, stream);
    } else if (per_lane <= 2) {
      launch<scalar_t, 2>(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, shape, stream);
    } else if (per_lane <= 4) {
      launch<scalar_t, 4>(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, shape, stream);
    } else {
      launch<scalar_t, 8>(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, shape, stream);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mistral_grpc, CUDA, m) { m.impl("paged_attention", &paged_attention_cuda); }

}  // namespace mistral_grpc
