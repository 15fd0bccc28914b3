"""Small pre-quantized Mistral checkpoints, and the dense weights each one stands for.

compressed-tensors checkpoints are written by the `compressed-tensors` package itself (what llm-compressor
calls to save): its quantization config on a transformers model, scales and zero points from its own
calculate_qparams over each weight's min/max (the calibration llm-compressor would do), its compressor, its
config writer; the reference weights are its own decompression of the saved tensors.

AWQ checkpoints are built from the GEMM layout of the issue: qweight int32 [K, N / 8] and qzeros int32
[K / G, N / 8], nibble i of word c holding column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i], scales fp16 [K / G, N],
quantized as AutoAWQ's pseudo_quantize_tensor does with zero points; the reference weights are
(q - zero) * scale from the unpacked values. autoawq (deprecated) does not import beside this project's torch
and transformers; its WQLinear_GEMM.from_linear (0.2.9), run once by hand on awq_quantize's output, wrote the
same qweight, qzeros and scales as awq_pack.
"""

import json
import os

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                             apply_quantization_config)
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import load_file, save_file
from transformers import MistralForCausalLM

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def linear_names(model: MistralForCausalLM) -> list[str]:
    return [f"model.layers.{i}.{p}" for i in range(model.config.num_hidden_layers) for p in PROJECTIONS]


def save_compressed_tensors_model(model: MistralForCausalLM, path: str | os.PathLike, *, bits: int, strategy: str,
                                  symmetric: bool, group_size: int | None = None,
                                  ignore: tuple[str, ...] = ("lm_head",)) -> None:
    """Quantizes `model` in place with compressed-tensors (pack-quantized) and saves it to `path`."""
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy, group_size=group_size)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                                ignore=list(ignore), format="pack-quantized")
    apply_quantization_config(model, config)
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        w = module.weight.data
        rows = w.reshape(w.shape[0], -1, group_size) if strategy == "group" else w.unsqueeze(1)
        scale, zero = calculate_qparams(rows.amin(-1), rows.amax(-1), scheme.weights)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor(quantization_config=config)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)


def compressed_tensors_reference(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The library's own decompression of every quantized module of a saved checkpoint, float32 [N, K] by
    module name. Scales go in as float32, so the library's (q - zero) * scale is the exact product."""
    with open(os.path.join(path, "config.json")) as f:
        config = QuantizationConfig.model_validate(json.load(f)["quantization_config"])
    scheme = config.config_groups["group_0"]
    tensors = load_file(os.path.join(path, "model.safetensors"))
    modules = sorted({name.rsplit(".", 1)[0] for name in tensors if name.endswith(".weight_packed")})
    dense = {}
    for module in modules:
        state = {name.rsplit(".", 1)[1]: t for name, t in tensors.items() if name.rsplit(".", 1)[0] == module}
        state["weight_scale"] = state["weight_scale"].float()
        dense[module] = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    return dense


def save_awq_model(model: MistralForCausalLM, path: str | os.PathLike, group_size: int = 128,
                   modules_to_not_convert: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Saves `model` as an AWQ GEMM 4-bit checkpoint; returns each quantized module's weight, float32 [N, K],
    as the layout defines it ((q - zero) * scale)."""
    model.save_pretrained(path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    reference = {}
    for module in linear_names(model):
        if any(skip in module for skip in modules_to_not_convert or []):
            continue
        q, zero, scale = awq_quantize(tensors.pop(f"{module}.weight").float(), group_size)
        tensors[f"{module}.qweight"] = awq_pack(q.t())
        tensors[f"{module}.qzeros"] = awq_pack(zero.t())
        tensors[f"{module}.scales"] = scale.t().contiguous()
        groups = torch.arange(q.shape[1]) // group_size
        reference[module] = (q.float() - zero[:, groups].float()) * scale[:, groups].float()
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm",
                                     "zero_point": True, "modules_to_not_convert": modules_to_not_convert}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return reference


def awq_quantize(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ's pseudo_quantize_tensor with zero points: q int32 [N, K], zero int32 and scale fp16 [N, K / G]."""
    groups = w.reshape(w.shape[0], -1, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low).clamp(min=1e-5) / 15).half()
    zero = (-torch.round(low / scale.float())).clamp(0, 15).int()
    q = (torch.round(groups / scale.float().unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, 15).int()
    return q.flatten(1), zero, scale


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """int32 [R, C / 8] from 4-bit values [R, C]: nibble i of word c holds column 8c + AWQ_ORDER[i]."""
    blocks = values.reshape(values.shape[0], -1, 8).int()
    packed = torch.zeros(blocks.shape[:2], dtype=torch.int32)
    for i, column in enumerate(AWQ_ORDER):
        packed |= blocks[:, :, column] << (4 * i)
    return packed


def save_dense_twin(model: MistralForCausalLM, weights: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Saves `model` (float, unquantized) with its linear weights replaced by `weights` (module -> [N, K])."""
    with torch.no_grad():
        for module, weight in weights.items():
            model.get_submodule(module).weight.copy_(weight)
    model.save_pretrained(path)
