"""The demo model: Mistral-7B-Instruct v0.2's architecture scaled down, random weights, the real tokenizer.

It lets the service (and tests) run anywhere in seconds. The weights come from a fixed seed, so every
build is byte-identical; the text it writes is meaningless.
"""

import json
import os
import shutil

import torch
from safetensors.torch import save_file

from mistral_grpc.model.config import MistralConfig

# Mistral's v1 tokenizer (32000 pieces, the one of v0.1 and v0.2) as a Hugging Face tokenizer.json,
# converted from mistral-common's tokenizer.model.v1.
TOKENIZER_SOURCE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "mistral_tokenizer_v1.json")
_SEED = 20231211  # v0.2's release day


def demo_config() -> MistralConfig:
    """v0.2's shape (GQA 4:1, rope_theta 1e6, no sliding window, 32k context, 32000 vocab) at 1/16 the width
    and 1/8 the depth: about 20M parameters, most of them the embedding and lm_head."""
    return MistralConfig(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=896,
        vocab_size=32000,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        sliding_window=None,
        max_position_embeddings=32768,
        torch_dtype=torch.float32,
    )


def demo_weights(config: MistralConfig) -> dict[str, torch.Tensor]:
    """Random weights under transformers' names. Projections get std 1/sqrt(fan_in), so every layer moves
    the residual stream and logits spread over a few units (HF's 0.02 would leave next-token distributions
    nearly flat)."""
    generator = torch.Generator().manual_seed(_SEED)
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size

    def normal(rows: int, cols: int, std: float) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator) * std

    def projection(rows: int, cols: int) -> torch.Tensor:
        return normal(rows, cols, cols ** -0.5)

    weights = {"model.embed_tokens.weight": normal(v, h, 1.0)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        weights.update({
            p + "input_layernorm.weight": torch.ones(h),
            p + "self_attn.q_proj.weight": projection(config.q_size, h),
            p + "self_attn.k_proj.weight": projection(config.kv_size, h),
            p + "self_attn.v_proj.weight": projection(config.kv_size, h),
            p + "self_attn.o_proj.weight": projection(h, config.q_size),
            p + "post_attention_layernorm.weight": torch.ones(h),
            p + "mlp.gate_proj.weight": projection(f, h),
            p + "mlp.up_proj.weight": projection(f, h),
            p + "mlp.down_proj.weight": projection(h, f),
        })
    weights["model.norm.weight"] = torch.ones(h)
    weights["lm_head.weight"] = normal(v, h, 3 * h ** -0.5)
    return weights


def write_demo_model(out_dir: str | os.PathLike, with_tokenizer: bool = True) -> str:
    """Writes config.json, model.safetensors and (unless told not to) tokenizer.json into out_dir; returns it.

    Each file is written beside its final name and renamed into place, so a process loading the directory
    while another rewrites it sees whole files.
    """
    out_dir = os.fspath(out_dir)
    if with_tokenizer and not os.path.isfile(TOKENIZER_SOURCE):
        raise FileNotFoundError(f"the demo's tokenizer is missing from the package: {TOKENIZER_SOURCE}")
    os.makedirs(out_dir, exist_ok=True)
    config = demo_config()

    def place(name: str, write) -> None:
        staging = os.path.join(out_dir, f".{name}.{os.getpid()}.tmp")
        write(staging)
        os.replace(staging, os.path.join(out_dir, name))

    place("config.json", lambda path: _write_json(path, config.to_dict()))
    place("model.safetensors", lambda path: save_file(demo_weights(config), path, metadata={"format": "pt"}))
    if with_tokenizer:
        place("tokenizer.json", lambda path: shutil.copyfile(TOKENIZER_SOURCE, path))
    return out_dir


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
