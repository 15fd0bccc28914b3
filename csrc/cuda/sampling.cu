// Penalty and sampling kernels on CUDA: one block per row on the current stream. Sampling follows
// the rule of common/sampling.h and finds its top-k / top-p thresholds by bisection over the
// logits' order keys, one block reduction per step, so nothing is sorted. Reductions have a fixed
// shape (cub, fixed block size), so a row's result is the same from run to run and whatever else
// is in the batch.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "common/philox.h"
#include "common/sampling.h"
#include "ops.h"

namespace mistral_grpc {
namespace {

constexpr int kThreads = 1024;

// --- apply_penalties -------------------------------------------------------------------------

// marks row: kListed once a token occurs in the prompt or output, plus its output count. The
// thread whose atomicExch takes a token's non-zero mark penalises it, so duplicates count once.
constexpr int32_t kListed = 1 << 30;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    penalties_kernel(scalar_t* __restrict__ logits, int64_t vocab, const int64_t* __restrict__ prompt,
                     int64_t prompt_len, const int64_t* __restrict__ output, int64_t output_len,
                     const float* __restrict__ repetition, const float* __restrict__ presence,
                     const float* __restrict__ frequency, int32_t* __restrict__ marks) {
  const int64_t row = blockIdx.x;
  const float rep = repetition[row], pres = presence[row], freq = frequency[row];
  if (penalties_neutral(rep, pres, freq)) return;
  scalar_t* x = logits + row * vocab;
  int32_t* mark = marks + row * vocab;
  prompt += row * prompt_len;
  output += row * output_len;
  // Ids outside [0, V) are padding (-1) or cannot have a logit to penalise.
  const auto in_vocab = [vocab](int64_t t) { return t >= 0 && t < vocab; };
  for (int64_t i = threadIdx.x; i < prompt_len; i += blockDim.x)
    if (in_vocab(prompt[i])) atomicOr(&mark[prompt[i]], kListed);
  for (int64_t i = threadIdx.x; i < output_len; i += blockDim.x) {
    if (!in_vocab(output[i])) continue;
    atomicAdd(&mark[output[i]], 1);
    atomicOr(&mark[output[i]], kListed);
  }
  __syncthreads();
  const auto penalize = [&](int64_t t) {
    if (!in_vocab(t)) return;
    const int32_t m = atomicExch(&mark[t], 0);
    if (m != 0)
      x[t] = static_cast<scalar_t>(
          penalized_logit(static_cast<float>(x[t]), m & (kListed - 1), /*seen=*/true, rep, pres, freq));
  };
  for (int64_t i = threadIdx.x; i < prompt_len; i += blockDim.x) penalize(prompt[i]);
  for (int64_t i = threadIdx.x; i < output_len; i += blockDim.x) penalize(output[i]);
}

void apply_penalties_cuda(at::Tensor& logits, const at::Tensor& prompt_tokens, const at::Tensor& output_tokens,
                          const at::Tensor& repetition, const at::Tensor& presence, const at::Tensor& frequency) {
  check_apply_penalties_args(logits, prompt_tokens, output_tokens, repetition, presence, frequency);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  if (rows == 0) return;
  at::Tensor marks = logits.new_zeros({rows, vocab}, logits.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "apply_penalties_cuda", [&] {
    penalties_kernel<scalar_t><<<rows, kThreads, 0, stream>>>(
        logits.mutable_data_ptr<scalar_t>(), vocab, prompt_tokens.const_data_ptr<int64_t>(), prompt_tokens.size(1),
        output_tokens.const_data_ptr<int64_t>(), output_tokens.size(1), repetition.const_data_ptr<float>(),
        presence.const_data_ptr<float>(), frequency.const_data_ptr<float>(), marks.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// --- sample ----------------------------------------------------------------------------------

struct ArgMax {
  float value;
  int64_t index;
};

// Block-wide reductions whose result every thread receives (cub reduces into thread 0).
class Block {
 public:
  struct Shared {
    union {
      typename cub::BlockReduce<float, kThreads>::TempStorage sum;
      typename cub::BlockReduce<int64_t, kThreads>::TempStorage count;
      typename cub::BlockReduce<ArgMax, kThreads>::TempStorage argmax;
      typename cub::BlockScan<double, kThreads>::TempStorage scan;
    } temp;
    float float_result;
    int64_t int_result;
    ArgMax argmax_result;
  };

  __device__ explicit Block(Shared& shared) : s_(shared) {}

  __device__ float sum(float v) {
    return share(cub::BlockReduce<float, kThreads>(s_.temp.sum).Sum(v), s_.float_result);
  }

  __device__ int64_t count(int64_t v) {
    return share(cub::BlockReduce<int64_t, kThreads>(s_.temp.count).Sum(v), s_.int_result);
  }

  __device__ int64_t min(int64_t v) {
    const auto smaller = [](int64_t a, int64_t b) { return b < a ? b : a; };
    return share(cub::BlockReduce<int64_t, kThreads>(s_.temp.count).Reduce(v, smaller), s_.int_result);
  }

  __device__ ArgMax argmax(ArgMax v) {
    const auto better = [](const ArgMax& a, const ArgMax& b) {
      return greedy_prefers(b.value, b.index, a.value, a.index) ? b : a;
    };
    return share(cub::BlockReduce<ArgMax, kThreads>(s_.temp.argmax).Reduce(v, better), s_.argmax_result);
  }

  // Exclusive prefix sum in thread order; `total` gets the block's sum.
  __device__ double exclusive_prefix(double v, double& total) {
    double prefix;
    cub::BlockScan<double, kThreads>(s_.temp.scan).ExclusiveSum(v, prefix, total);
    __syncthreads();
    return prefix;
  }

 private:
  template <typename T>
  __device__ T share(T reduced, T& slot) {
    if (threadIdx.x == 0) slot = reduced;
    __syncthreads();
    const T value = slot;
    __syncthreads();  // temp storage and slot are reused by the next reduction
    return value;
  }

  Shared& s_;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    sample_kernel(const scalar_t* __restrict__ logits, int64_t vocab, const float* __restrict__ temperature,
                  const float* __restrict__ top_p, const int64_t* __restrict__ top_k, const int64_t* __restrict__ seeds,
                  const int64_t* __restrict__ offsets, int64_t* __restrict__ tokens, float* __restrict__ logprobs) {
  __shared__ Block::Shared shared;
  Block block(shared);
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * vocab;
  const auto logit = [x](int64_t i) { return sanitize_logit(static_cast<float>(x[i])); };

  ArgMax best{.value = -INFINITY, .index = vocab};
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
    const float v = logit(i);
    if (greedy_prefers(v, i, best.value, best.index)) best = {.value = v, .index = i};
  }
  best = block.argmax(best);
  const float max_logit = best.value;
  float exp_sum = 0.f;
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) exp_sum += expf(logit(i) - max_logit);
  const float log_norm = max_logit == -INFINITY ? NAN : max_logit + logf(block.sum(exp_sum));

  const float temp = temperature[row];
  int64_t chosen = best.index;
  if (temp != 0.f && max_logit != -INFINITY) {
    const auto weight = [&](int64_t i) { return expf(weight_exponent(logit(i), max_logit, temp)); };
    const uint32_t max_key = order_key(max_logit);
    uint32_t keep_key = order_key(-INFINITY);
    const int64_t k = top_k[row];
    if (top_k_active(k, vocab)) {
      keep_key = largest_key_where(keep_key, max_key, [&](uint32_t key) {
        int64_t n = 0;
        for (int64_t i = threadIdx.x; i < vocab; i += kThreads) n += order_key(logit(i)) >= key;
        return block.count(n) >= k;
      });
    }
    const float p = top_p[row];
    if (top_p_active(p)) {
      const auto mass_from = [&](uint32_t key) {
        float mass = 0.f;
        for (int64_t i = threadIdx.x; i < vocab; i += kThreads)
          if (order_key(logit(i)) >= key) mass += weight(i);
        return block.sum(mass);
      };
      const float target = p * mass_from(keep_key);
      keep_key = largest_key_where(keep_key, max_key, [&](uint32_t key) { return mass_from(key) >= target; });
    }
    const float keep_from = from_order_key(keep_key);

    // Inverse CDF in token-id order: each thread owns a contiguous slice of the vocabulary. The sums
    // are double, as on the CPU: in float each weight below half an ulp of the sum so far rounds
    // away, so a peaked row's long tail of tiny weights lost its draws to the next slice's first
    // token, a masked one included. Zero weights (masked tokens) are never chosen.
    const int64_t slice = (vocab + kThreads - 1) / kThreads;
    const int64_t begin = min(static_cast<int64_t>(threadIdx.x) * slice, vocab), end = min(begin + slice, vocab);
    double kept = 0.;
    for (int64_t i = begin; i < end; ++i)
      if (logit(i) >= keep_from) kept += weight(i);
    double total;
    double running = block.exclusive_prefix(kept, total);
    const double target =
        philox_uniform(static_cast<uint64_t>(seeds[row]), static_cast<uint64_t>(offsets[row])) * total;
    int64_t crossing = vocab;
    for (int64_t i = begin; i < end; ++i) {
      const float w = logit(i) < keep_from ? 0.f : weight(i);
      if (w == 0.f) continue;
      running += w;
      if (passes_target(running, target)) {
        crossing = i;
        break;
      }
    }
    crossing = block.min(crossing);
    if (crossing < vocab) chosen = crossing;  // else u * total rounded up to total: keep the top token
  }
  if (threadIdx.x == 0) {
    tokens[row] = chosen;
    logprobs[row] = logit(chosen) - log_norm;
  }
}

void sample_cuda(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_p,
                 const at::Tensor& top_k, const at::Tensor& seeds, const at::Tensor& offsets, at::Tensor& tokens,
                 at::Tensor& logprobs) {
  check_sample_args(logits, temperature, top_p, top_k, seeds, offsets, tokens, logprobs);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  if (rows == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "sample_cuda", [&] {
    sample_kernel<scalar_t><<<rows, kThreads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), vocab, temperature.const_data_ptr<float>(), top_p.const_data_ptr<float>(),
        top_k.const_data_ptr<int64_t>(), seeds.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
        tokens.mutable_data_ptr<int64_t>(), logprobs.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mistral_grpc, CUDA, m) {
  m.impl("apply_penalties", &apply_penalties_cuda);
  m.impl("sample", &sample_cuda);
}

}  // namespace mistral_grpc
