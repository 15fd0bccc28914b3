// The CPU implementations of the decoder's ops, for the one op that chains them without the
// dispatcher (cpu/decoder_layer.cpp). Each checks its own arguments as when called through torch.ops.
#pragma once

#include <ATen/core/Tensor.h>

namespace mistral_grpc {

void fused_add_rms_norm_cpu(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps);
void rotary_embedding_cpu(const at::Tensor& positions, at::Tensor& q, at::Tensor& k, const at::Tensor& cos_sin_cache);
void reshape_and_cache_cpu(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                           const at::Tensor& slot_mapping);
void paged_attention_cpu(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& block_tables, const at::Tensor& seq_lens,
                         const at::Tensor& query_start_loc, double scale, int64_t sliding_window);
void linear_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed_weight, int64_t prompt_rows);
void linear_silu_mul_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed_gate_up,
                         int64_t prompt_rows);
// Whether the CPU kernels may use AMX: the CPU and OS allow it and linear_cpu_isa has not lowered the
// level below "amx". Prefill attention's AMX path follows the linear layers' level, so tests that
// lower it reach attention's vector path too.
bool cpu_amx_selected();
// Zeroed bytes on 2 MiB pages where the kernel allows: the packed weights' allocation.
at::Tensor zeroed_bytes(int64_t bytes);

}  // namespace mistral_grpc
