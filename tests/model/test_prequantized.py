"""Pre-quantized checkpoints (compressed-tensors pack-quantized, AWQ GEMM) loaded as published: every packed
weight equals the reference decompression, the decoder's logits and greedy tokens match a dense model holding
those same weights (to the kernels' int8 rounding of activations), and what the layout cannot hold is refused
by name."""

import json

import pytest
import torch
from mistral_checkpoints import SMALL, V02, PagedRunner, random_hf_model
from prequantized_checkpoints import (compressed_tensors_reference, linear_names, save_awq_model,
                                      save_compressed_tensors_model, save_dense_twin)

from mistral_grpc import ops
from mistral_grpc.model.config import ConfigError, MistralConfig
from mistral_grpc.model.decoder import MistralDecoder
from mistral_grpc.model.linear import QuantizationError
from mistral_grpc.model.weights import WeightsError

# K of every projection a multiple of 128, so each group size divides it.
SHAPE = dict(intermediate_size=384)
# (bits, strategy, group_size, symmetric)
CT_SCHEMES = [(4, "group", 32, True), (4, "group", 128, False), (4, "group", 64, True), (4, "channel", None, False),
              (8, "channel", None, True), (8, "channel", None, False)]
# Relative error of the logits against the dense twin (a prefill and 8 decode steps): the packed weights are the
# twin's exactly, so this is only the kernels' int8 rounding of the activations (per 32 values), 2-3% on this
# small sharp model.
LOGITS_BOUND = 0.05
# On CUDA (weight-only) the same comparison leaves only the two sides' rounding: fp32 sums in another order,
# or the float16 model's own roundings.
CUDA_LOGITS_BOUNDS = {"float32": 1e-4, "float16": 2e-2}


def source_model(dtype: torch.dtype):
    return random_hf_model(0, **SHAPE).to(dtype)


def packed_weights(model: MistralDecoder) -> dict[str, torch.Tensor]:
    """Every projection of the decoder as its pack holds it, under the checkpoint's module names."""
    weights = {}
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        q, k, v = ops.unpack_linear_weight(layer.qkv_proj.packed).split(
            [model.config.q_size, model.config.kv_size, model.config.kv_size])
        gate, up = ops.unpack_linear_weight(layer.gate_up_silu.packed).chunk(2)
        weights.update({prefix + "self_attn.q_proj": q, prefix + "self_attn.k_proj": k, prefix + "self_attn.v_proj": v,
                        prefix + "self_attn.o_proj": ops.unpack_linear_weight(layer.o_proj.packed),
                        prefix + "mlp.gate_proj": gate, prefix + "mlp.up_proj": up,
                        prefix + "mlp.down_proj": ops.unpack_linear_weight(layer.down_proj.packed)})
    return weights


def logits_and_the_dense_twins(quantized_dir, dense_dir, device: str = "cpu",
                               dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-quantized model's logits (a 19-token prefill, then 8 greedy steps) and the dense one's holding
    its weights, teacher-forced on the dense model's tokens."""
    tokens = torch.randint(3, 1000, (19,), generator=torch.Generator().manual_seed(2)).tolist()
    dense = MistralDecoder.from_dir(dense_dir, device, dtype=dtype)
    generated, reference = PagedRunner(dense, 16).greedy("a", tokens, steps=8)
    model = MistralDecoder.from_dir(quantized_dir, device, dtype=dtype)
    runner = PagedRunner(model, 16)
    logits = [runner.step({"a": tokens})["a"]] + [runner.step({"a": [t]})["a"] for t in generated[:-1]]
    return torch.stack(logits), torch.stack(reference)


def assert_logits_match_the_dense_twin(quantized_dir, dense_dir) -> None:
    """Greedy tokens and logits of the pre-quantized model against the dense one holding its weights."""
    got, want = logits_and_the_dense_twins(quantized_dir, dense_dir)
    error = ((got - want).norm() / want.norm()).item()
    assert 0 < error < LOGITS_BOUND
    for step_got, step_want in zip(got, want):
        top2 = step_want.topk(2).values
        if top2[0] - top2[1] > 2 * (step_got - step_want).abs().max():  # the margin outweighs the rounding
            assert step_got.argmax() == step_want.argmax()
    logprobs_got, logprobs_want = got.log_softmax(-1), want.log_softmax(-1)
    assert (logprobs_got - logprobs_want).abs().max() < 0.5


@pytest.mark.parametrize("bits,strategy,group_size,symmetric", CT_SCHEMES)
def test_compressed_tensors_weights_equal_the_library_decompression(tmp_path, bits, strategy, group_size,
                                                                    symmetric) -> None:
    save_compressed_tensors_model(source_model(torch.bfloat16), tmp_path, bits=bits, strategy=strategy,
                                  group_size=group_size, symmetric=symmetric)
    reference = compressed_tensors_reference(tmp_path)
    model = MistralDecoder.from_dir(tmp_path)  # bfloat16, as saved
    assert model.dtype == torch.bfloat16
    packed = packed_weights(model)
    assert sorted(packed) == sorted(reference) == sorted(linear_names(source_model(torch.float32)))
    for name, weight in reference.items():
        assert torch.equal(packed[name], weight), name
    # lm_head is in `ignore`: dense, packed as bf16 (dtype word 2), holding the checkpoint's own weights.
    assert int(model.lm_head.packed[4]) == 2
    assert torch.equal(ops.unpack_linear_weight(model.lm_head.packed), source_model(torch.bfloat16).lm_head.weight)
    scheme = f"int{bits} {'per channel' if group_size is None else f'group {group_size}'}"
    assert model.quantization_description == (f"compressed-tensors {scheme} "
                                              f"{'symmetric' if symmetric else 'asymmetric'}")


@pytest.mark.parametrize("bits,strategy,group_size,symmetric", [CT_SCHEMES[1], CT_SCHEMES[5]])
def test_compressed_tensors_logits_match_the_dense_model(tmp_path, bits, strategy, group_size, symmetric) -> None:
    save_compressed_tensors_model(source_model(torch.bfloat16), tmp_path / "ct", bits=bits, strategy=strategy,
                                  group_size=group_size, symmetric=symmetric)
    save_dense_twin(source_model(torch.bfloat16).float(), compressed_tensors_reference(tmp_path / "ct"),
                    tmp_path / "dense")
    assert_logits_match_the_dense_twin(tmp_path / "ct", tmp_path / "dense")


def test_compressed_tensors_without_lm_head_in_ignore_packs_it_quantized(tmp_path) -> None:
    save_compressed_tensors_model(source_model(torch.bfloat16), tmp_path, bits=8, strategy="channel",
                                  symmetric=True, ignore=())
    model = MistralDecoder.from_dir(tmp_path)
    assert int(model.lm_head.packed[4]) == 3  # int8
    assert torch.equal(ops.unpack_linear_weight(model.lm_head.packed), compressed_tensors_reference(tmp_path)["lm_head"])


def test_awq_weights_equal_the_layout_and_logits_match_the_dense_model(tmp_path) -> None:
    # float16, as AWQ checkpoints are published: served in bfloat16 unless --dtype says otherwise.
    reference = save_awq_model(source_model(torch.float16), tmp_path / "awq", group_size=128)
    model = MistralDecoder.from_dir(tmp_path / "awq")
    assert model.dtype == torch.bfloat16
    assert model.quantization_description == "awq int4 group 128 asymmetric"
    packed = packed_weights(model)
    assert sorted(packed) == sorted(reference)
    for name, weight in reference.items():
        assert torch.equal(packed[name], weight), name
    save_dense_twin(source_model(torch.float16).float(), reference, tmp_path / "dense")
    assert_logits_match_the_dense_twin(tmp_path / "awq", tmp_path / "dense")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_on_cuda_an_awq_checkpoint_is_its_dense_twin_to_rounding(tmp_path, dtype: str) -> None:
    """On CUDA nothing quantizes the activations: the packs moved to the GPU hold the twin's weights exactly."""
    reference = save_awq_model(source_model(torch.float16), tmp_path / "awq", group_size=128)
    save_dense_twin(source_model(torch.float16).float(), reference, tmp_path / "dense")
    model = MistralDecoder.from_dir(tmp_path / "awq", "cuda", dtype=dtype)
    assert model.layers[0].qkv_proj.packed.is_cuda and not model.layers[0].packed
    packed = packed_weights_moved_to_the_cpu(model)
    assert sorted(packed) == sorted(reference)
    for name, weight in reference.items():
        assert torch.equal(packed[name], weight), name
    got, want = logits_and_the_dense_twins(tmp_path / "awq", tmp_path / "dense", "cuda", dtype)
    assert ((got - want).norm() / want.norm()).item() < CUDA_LOGITS_BOUNDS[dtype]


def packed_weights_moved_to_the_cpu(model: MistralDecoder) -> dict[str, torch.Tensor]:
    """packed_weights of a CUDA model, whose layers' packs it moves back to the CPU (float32 in the header, so
    that unpack_linear_weight reads a float16 one): the model cannot run after it."""
    for layer in model.layers:
        for projection in (layer.qkv_proj, layer.o_proj, layer.gate_up_silu, layer.down_proj):
            projection.packed = ops.with_activation(projection.packed.cpu(), torch.float32)
    return packed_weights(model)


def test_awq_modules_to_not_convert_stay_dense(tmp_path) -> None:
    reference = save_awq_model(source_model(torch.float16), tmp_path, group_size=64, modules_to_not_convert=["mlp"])
    model = MistralDecoder.from_dir(tmp_path, dtype="float32")
    layer = model.layers[0]
    assert int(layer.qkv_proj.packed[4]) == 4 and int(layer.down_proj.packed[4]) == 1  # int4, float32
    assert torch.equal(ops.unpack_linear_weight(layer.down_proj.packed),
                       source_model(torch.float16).model.layers[0].mlp.down_proj.weight.float())
    assert torch.equal(ops.unpack_linear_weight(layer.o_proj.packed), reference["model.layers.0.self_attn.o_proj"])


def ct_config(**weights) -> dict:
    args = dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128) | weights
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": args}}, "ignore": ["lm_head"]}


@pytest.mark.parametrize("quantization_config,message", [
    ({"quant_method": "gptq", "bits": 4, "desc_act": True}, r"'gptq' with act-order \(desc_act\) checkpoints do not"),
    ({"quant_method": "fp8"}, "'fp8' checkpoints do not load"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes' checkpoints do not load"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "AWQ version 'gemv' does not load"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, "AWQ without zero points"),
    ({"quant_method": "awq", "bits": 4, "group_size": 16}, "AWQ in groups of 16"),
    (ct_config(num_bits=8, group_size=128), "compressed-tensors int8 in groups of 128"),
    (ct_config(actorder="group"), r"compressed-tensors act-order GPTQ \(actorder 'group'\)"),
    (ct_config(type="float", num_bits=8, strategy="channel"), "compressed-tensors float8 weights"),
    (ct_config(strategy="tensor"), "compressed-tensors strategy 'tensor'"),
    (ct_config() | {"format": "float-quantized"}, "compressed-tensors format 'float-quantized'"),
    (ct_config() | {"kv_cache_scheme": {"num_bits": 8}}, "compressed-tensors with a kv_cache_scheme"),
    ({**ct_config(), "config_groups": {"group_0": {**ct_config()["config_groups"]["group_0"],
                                                   "input_activations": {"num_bits": 8}}}},
     r"compressed-tensors activation quantization \(e.g. W8A8\)"),
])
def test_unsupported_quantizations_are_refused_by_name(quantization_config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        MistralConfig.from_dict({**SMALL, **V02, "torch_dtype": "bfloat16", "quantization_config": quantization_config})
    assert "supported: compressed-tensors pack-quantized" in str(error.value)
    assert error.value.field.startswith("quantization_config.")


@pytest.fixture(scope="module")
def int4_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ct_int4")
    save_compressed_tensors_model(source_model(torch.bfloat16), path, bits=4, strategy="group", group_size=32,
                                  symmetric=True)
    return path


def test_quantizing_a_pre_quantized_checkpoint_again_is_refused(int4_checkpoint) -> None:
    with pytest.raises(QuantizationError, match=r"already quantized \(compressed-tensors\): --quantization must be"):
        MistralDecoder.from_dir(int4_checkpoint, quantization="int8")
    with pytest.raises(QuantizationError, match=r"pre-quantized \(compressed-tensors\) checkpoint needs --dtype"):
        MistralDecoder.from_dir(int4_checkpoint, dtype="float16")
    with pytest.raises(QuantizationError, match="runs on the CPU and CUDA only"):
        MistralDecoder.from_dir(int4_checkpoint, device="meta")


def test_a_fused_projection_with_two_schemes_is_refused(tmp_path) -> None:
    save_compressed_tensors_model(source_model(torch.bfloat16), tmp_path, bits=4, strategy="group", group_size=32,
                                  symmetric=True, ignore=("lm_head", "re:.*k_proj"))
    with pytest.raises(WeightsError, match=r"self_attn.q_proj, .*self_attn.v_proj are fused into one qkv weight"):
        MistralDecoder.from_dir(tmp_path)


def test_packed_tensors_without_a_quantization_config_are_refused(int4_checkpoint, tmp_path) -> None:
    config = json.loads((int4_checkpoint / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(int4_checkpoint / "model.safetensors")
    with pytest.raises(WeightsError, match="lacks 14 tensor"):
        MistralDecoder.from_dir(tmp_path)


def test_a_packed_tensor_of_the_wrong_shape_is_refused(int4_checkpoint, tmp_path) -> None:
    config = json.loads((int4_checkpoint / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(int4_checkpoint / "model.safetensors")
    with pytest.raises(WeightsError, match=r"weight_scale in .*: torch.bfloat16 \[\d+, \d+\], the quantization_config"):
        MistralDecoder.from_dir(tmp_path)
