"""The decoder with --quantization int8 / int4 against the unquantized one on the same random weights,
the logits of a prefill and of every greedy decode step after it."""

import pytest
import torch
from mistral_checkpoints import SMALL, V02, PagedRunner, save_random_model

from mistral_grpc.model.config import ConfigError, MistralConfig
from mistral_grpc.model.decoder import MistralDecoder
from mistral_grpc.model.linear import QuantizationError

# Relative error of the logits (Frobenius, over a prefill and 8 decode steps) on this small random model
# (hidden 128, 2 layers): int8 ~4%, int4 ~35%, of which weight-only quantization alone makes 3% and 35%.
BOUNDS = {"int8": 0.06, "int4": 0.45}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("quantized")
    save_random_model(path, **V02)
    return path


# CUDA is weight-only (x is not quantized): int8 sits well inside the CPU's bound there.
CUDA_BOUNDS = {"int8": 0.04, "int4": 0.45}


def logits_error(checkpoint, quantization: str, dtype: str, device: str = "cpu") -> float:
    """The quantized model's logits against the float one's on `device`, teacher-forced on the float model's
    greedy tokens (a 21-token prefill, then 8 decode steps)."""
    tokens = torch.randint(3, 1000, (21,), generator=torch.Generator().manual_seed(1)).tolist()
    float_model = MistralDecoder.from_dir(checkpoint, device, dtype=dtype)
    generated, reference = PagedRunner(float_model, 16).greedy("a", tokens, steps=8)
    quantized = MistralDecoder.from_dir(checkpoint, device, dtype=dtype, quantization=quantization)
    assert quantized.quantization == quantization
    assert quantized.weight_bytes < float_model.weight_bytes
    # Teacher-forced on the float model's tokens, so both see the same sequence.
    runner = PagedRunner(quantized, 16)
    logits = [runner.step({"a": tokens})["a"]] + [runner.step({"a": [t]})["a"] for t in generated[:-1]]
    got, want = torch.stack(logits).float(), torch.stack(reference).float()
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_logits_stay_close_to_the_float_model(checkpoint, quantization: str, dtype: str) -> None:
    assert 0 < logits_error(checkpoint, quantization, dtype) < BOUNDS[quantization]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_on_cuda_quantized_logits_stay_close_to_the_float_model(checkpoint, quantization: str, dtype: str) -> None:
    assert 0 < logits_error(checkpoint, quantization, dtype, "cuda") < CUDA_BOUNDS[quantization]


@pytest.mark.cuda
def test_on_cuda_the_packs_live_on_the_gpu_and_the_layers_run_op_by_op(checkpoint) -> None:
    model = MistralDecoder.from_dir(checkpoint, "cuda", dtype="float16", quantization="int4")
    layer = model.layers[0]
    assert not layer.packed  # ops.decoder_layer is the CPU's
    for projection in (layer.qkv_proj, layer.o_proj, layer.gate_up_silu, layer.down_proj, model.lm_head):
        assert projection.packed.is_cuda and projection.weight is None
        assert int(projection.packed[32]) == 5  # the header's activation: float16
    assert int(model.lm_head.packed[4].cpu()) == 3 and int(layer.qkv_proj.packed[4].cpu()) == 4


def test_the_lm_head_of_an_int4_model_is_int8(checkpoint) -> None:
    model = MistralDecoder.from_dir(checkpoint, dtype="float32", quantization="int4")
    # The pack header's dtype word (offset 4): 3 = int8, 4 = int4.
    assert int(model.lm_head.packed[4]) == 3
    assert int(model.layers[0].qkv_proj.packed[4]) == 4


def test_quantization_where_no_kernel_runs_is_a_clear_error(checkpoint) -> None:
    with pytest.raises(QuantizationError, match="runs on the CPU and CUDA only"):
        MistralDecoder.from_dir(checkpoint, device="meta", quantization="int8")
    with pytest.raises(QuantizationError, match="needs --dtype float32 or bfloat16"):
        MistralDecoder.from_dir(checkpoint, dtype="float16", quantization="int4")
    with pytest.raises(QuantizationError, match="must be one of none, int8, int4"):
        MistralDecoder.from_dir(checkpoint, quantization="fp8")


def test_a_pre_quantized_checkpoint_is_detected_and_an_unsupported_one_refused_by_name() -> None:
    """Pre-quantized checkpoints load as such (tests/model/test_prequantized.py); others are refused."""
    awq = {"quant_method": "awq", "bits": 4, "group_size": 128}
    config = {**SMALL, **V02, "torch_dtype": "float16", "quantization_config": awq}
    assert MistralConfig.from_dict(config).quantization.method == "awq"
    config["quantization_config"]["version"] = "marlin"
    with pytest.raises(ConfigError, match=r"quantization_config.version: AWQ version 'marlin' does not load"):
        MistralConfig.from_dict(config)
