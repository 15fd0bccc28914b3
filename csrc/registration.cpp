// The op schemas of mistral_grpc (docs/ops.md). Tests outside the project call these exact
// schemas: add ops freely, never change one. Implementations register per backend in
// cpu/*.cpp (TORCH_LIBRARY_IMPL(mistral_grpc, CPU)) and cuda/*.cu (..., CUDA).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "ops.h"
#include "stop_matcher.h"

TORCH_LIBRARY(mistral_grpc, m) {
  // Decoder layer ops.
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("rotary_embedding(Tensor positions, Tensor(a!) q, Tensor(b!) k, Tensor cos_sin_cache) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor gate_up) -> ()");
  m.def("reshape_and_cache(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def(
      "paged_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor seq_lens, Tensor query_start_loc, float scale, int sliding_window) -> ()");
  // CPU linear layers on weights packed once at load (csrc/common/linear_pack.h); CUDA uses cuBLAS for float
  // weights and takes the quantized packs below (csrc/cuda/linear_quant.cu).
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  m.def("pack_gate_up_weight(Tensor gate, Tensor up) -> Tensor");
  m.def("unpack_linear_weight(Tensor packed) -> Tensor");
  // prompt_rows >= 0: rows [0, prompt_rows) take the batch kernels and the rest the decode ones, each
  // row's result independent of the other rows; -1: the kernels go by the batch's size.
  m.def("linear(Tensor(a!) out, Tensor x, Tensor packed_weight, int prompt_rows=-1) -> ()");
  m.def("linear_silu_mul(Tensor(a!) out, Tensor x, Tensor packed_gate_up, int prompt_rows=-1) -> ()");
  // Weight-only int8 / int4 quantization into the same ops' packed form (csrc/common/quant.h): `linear`,
  // `linear_silu_mul` and `decoder_layer` take these packs as they take the float ones.
  m.def("quantize_linear_weight(Tensor weight, str scheme, int group_size=0) -> Tensor");
  m.def("quantize_gate_up_weight(Tensor gate, Tensor up, str scheme, int group_size=0) -> Tensor");
  // Values quantized elsewhere (a pre-quantized checkpoint) into the same packs: q uint8 [N, K], scale and zero
  // [N, groups] (int8: bits 8, group_size 0, one group per row; int4: bits 4, group_size 32, 64 or 128), the
  // weight (q - zero) * scale with scale rounded to fp16; activation: the dtype of x and out.
  m.def(
      "pack_quantized_weight(Tensor q, Tensor scale, Tensor zero, int bits, int group_size, ScalarType activation) "
      "-> Tensor");
  m.def(
      "pack_quantized_gate_up_weight(Tensor gate_q, Tensor gate_scale, Tensor gate_zero, Tensor up_q, "
      "Tensor up_scale, Tensor up_zero, int bits, int group_size, ScalarType activation) -> Tensor");
  // The CUDA quantized kernels' arithmetic (csrc/common/quant_gemv.h) run on the CPU, for tests without a GPU:
  // linear (plain pack) or linear_silu_mul (gate_up pack) as the decode GEMV computes it, and the dense
  // [units * N, K] matrix the prefill path multiplies. Not serving paths.
  m.def("cuda_quant_math_linear(Tensor(a!) out, Tensor x, Tensor packed_weight) -> ()");
  m.def("cuda_quant_math_dequantize(Tensor packed_weight, ScalarType dtype) -> Tensor");
  m.def("read_bandwidth(Tensor buffer, int repeats) -> float");
  m.def("linear_cpu_isa(str isa=\"\") -> str");
  // A zeroed uint8 CPU tensor of nbytes, from 2 MiB on a 2 MiB-aligned mapping advised for huge pages
  // (the packed weights' allocation, for the KV cache and benchmark buffers too).
  m.def("zeroed_bytes(int nbytes) -> Tensor");
  // A whole decoder layer on the packed CPU weights, in place (cpu/decoder_layer.cpp): residual +=
  // hidden, then attention and the MLP as model/decoder.py chains the ops above; hidden ends as the
  // MLP's output, residual as the sum before the MLP. Writes the new tokens' k/v into the caches.
  m.def(
      "decoder_layer(Tensor(a!) hidden, Tensor(b!) residual, Tensor input_norm, Tensor post_attention_norm, "
      "Tensor qkv_weight, Tensor o_weight, Tensor gate_up_weight, Tensor down_weight, Tensor(c!) key_cache, "
      "Tensor(d!) value_cache, Tensor positions, Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, "
      "Tensor query_start_loc, Tensor cos_sin_cache, float eps, float scale, int sliding_window, "
      "int prompt_rows=-1) -> ()");
  // Sampling ops.
  m.def(
      "apply_penalties(Tensor(a!) logits, Tensor prompt_tokens, Tensor output_tokens, Tensor repetition, "
      "Tensor presence, Tensor frequency) -> ()");
  m.def(
      "sample(Tensor logits, Tensor temperature, Tensor top_p, Tensor top_k, Tensor seeds, Tensor offsets, "
      "Tensor(a!) tokens, Tensor(b!) logprobs) -> ()");
  // Structured output: bitmask int32 [B, ceil(V / 32)], bit set = token allowed, else logit = -inf.
  m.def("apply_token_bitmask(Tensor(a!) logits, Tensor bitmask) -> ()");
}

// A Python module, so `from mistral_grpc import _C` loads the library (and with it the op
// registrations above); host-side classes (the stop-string matcher) are bound here too.
PYBIND11_MODULE(_C, m) {
  m.doc() = "mistral_grpc torch extension: ops live under torch.ops.mistral_grpc";
  mistral_grpc::bind_stop_matcher(m);
}
