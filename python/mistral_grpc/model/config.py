"""The model's geometry, read from a Hugging Face config.json and checked before any weight is touched.

Both spellings Hugging Face has used are read: the hub's files for Mistral-7B-Instruct v0.1-v0.3
(`rope_theta`, `torch_dtype`) and what transformers 5 writes (`rope_parameters`, `dtype`). Where a
file holds both and they disagree, that is an error: guessing would load a subtly wrong model.
"""

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from mistral_grpc.model.prequantized import PrequantizedConfig, QuantizationConfigError, parse_quantization_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A config.json that cannot describe a Mistral we can run; `field` names the culprit."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(f"config.json: {field}: {message}" if field else f"config.json: {message}")
        self.field = field


@dataclass(frozen=True)
class MistralConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    sliding_window: int | None  # None: full attention (v0.2, v0.3); 4096 in v0.1
    max_position_embeddings: int
    torch_dtype: torch.dtype
    tie_word_embeddings: bool = False
    # A pre-quantized checkpoint's quantization_config (model/prequantized.py); None: float weights.
    quantization: PrequantizedConfig | None = None

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "MistralConfig":
        config_path = os.path.join(path, "config.json")
        try:
            with open(config_path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ConfigError(None, f"no config.json in {os.fspath(path)!r}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(None, f"{config_path!r} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(None, f"{config_path!r} must hold a JSON object")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MistralConfig":
        _expect_if_present(d, "model_type", "mistral")
        _expect_if_present(d, "hidden_act", "silu")
        quantization = _quantization(d)
        if d.get("rope_scaling") is not None:
            raise ConfigError("rope_scaling", f"RoPE scaling is not supported (got {d['rope_scaling']!r})")

        hidden_size = _positive_int(d, "hidden_size")
        num_heads = _positive_int(d, "num_attention_heads")
        num_kv_heads = _positive_int(d, "num_key_value_heads")
        if num_heads % num_kv_heads:
            raise ConfigError("num_key_value_heads",
                              f"{num_kv_heads} does not divide num_attention_heads ({num_heads})")
        if d.get("head_dim") is None:
            if hidden_size % num_heads:
                raise ConfigError("head_dim", f"absent, and hidden_size ({hidden_size}) is not a multiple of "
                                              f"num_attention_heads ({num_heads})")
            head_dim = hidden_size // num_heads
        else:
            head_dim = _positive_int(d, "head_dim")
        if head_dim % 2:
            raise ConfigError("head_dim", f"rotary embeddings need an even head_dim, got {head_dim}")

        return cls(
            hidden_size=hidden_size,
            num_hidden_layers=_positive_int(d, "num_hidden_layers"),
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            intermediate_size=_positive_int(d, "intermediate_size"),
            vocab_size=_positive_int(d, "vocab_size"),
            rms_norm_eps=_positive_float(d, "rms_norm_eps"),
            rope_theta=_rope_theta(d),
            sliding_window=_sliding_window(d),
            max_position_embeddings=_positive_int(d, "max_position_embeddings"),
            torch_dtype=_torch_dtype(d),
            tie_word_embeddings=_bool(d, "tie_word_embeddings", default=False),
            quantization=quantization,
        )

    def to_dict(self) -> dict[str, Any]:
        """A config.json in the hub's spelling, which transformers and from_dict both read."""
        return {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": _dtype_name(self.torch_dtype),
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }


def _require(d: dict[str, Any], field: str) -> Any:
    if field not in d:
        raise ConfigError(field, "missing")
    return d[field]


def _expect_if_present(d: dict[str, Any], field: str, expected: str) -> None:
    if field in d and d[field] != expected:
        raise ConfigError(field, f"expected {expected!r}, got {d[field]!r}")


def _positive_int(d: dict[str, Any], field: str) -> int:
    value = _require(d, field)
    # bool is an int in Python; `true` is never a size.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(field, f"expected a positive integer, got {value!r}")
    return value


def _positive_float(d: dict[str, Any], field: str) -> float:
    value = _require(d, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(field, f"expected a positive number, got {value!r}")
    return float(value)


def _bool(d: dict[str, Any], field: str, default: bool) -> bool:
    value = d.get(field, default)
    if not isinstance(value, bool):
        raise ConfigError(field, f"expected true or false, got {value!r}")
    return value


def _rope_theta(d: dict[str, Any]) -> float:
    """rope_theta (hub files) or rope_parameters.rope_theta (transformers 5); never a default, since
    v0.1 (1e4) and v0.2/v0.3 (1e6) differ and a wrong guess still produces fluent-looking logits."""
    params = d.get("rope_parameters")
    if params is None:
        return _positive_float(d, "rope_theta")
    if not isinstance(params, dict):
        raise ConfigError("rope_parameters", f"expected an object, got {params!r}")
    if params.get("rope_type", "default") != "default":
        raise ConfigError("rope_parameters.rope_type", f"only 'default' RoPE is supported, got {params['rope_type']!r}")
    if "rope_theta" not in params:
        return _positive_float(d, "rope_theta")
    theta = _positive_float(params, "rope_theta")
    if "rope_theta" in d and _positive_float(d, "rope_theta") != theta:
        raise ConfigError("rope_theta", f"{d['rope_theta']!r} contradicts rope_parameters.rope_theta ({theta!r})")
    return theta


def _sliding_window(d: dict[str, Any]) -> int | None:
    # Required even though it may be null: transformers defaults a missing one to 4096, which would
    # silently truncate attention for v0.2/v0.3.
    if _require(d, "sliding_window") is None:
        return None
    return _positive_int(d, "sliding_window")


def _torch_dtype(d: dict[str, Any]) -> torch.dtype:
    names = {field: d[field] for field in ("torch_dtype", "dtype") if d.get(field) is not None}
    if not names:
        raise ConfigError("torch_dtype", "missing (neither torch_dtype nor dtype is set)")
    if len(set(names.values())) > 1:
        raise ConfigError("torch_dtype", f"{names['torch_dtype']!r} contradicts dtype ({names['dtype']!r})")
    field, name = next(iter(names.items()))
    if name not in DTYPES:
        raise ConfigError(field, f"expected one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _quantization(d: dict[str, Any]) -> PrequantizedConfig | None:
    """The checkpoint's quantization, detected from quantization_config; unsupported methods are refused."""
    if d.get("quantization_config") is None:
        return None
    try:
        return parse_quantization_config(d["quantization_config"])
    except QuantizationConfigError as e:
        raise ConfigError(f"quantization_config.{e.field}", str(e)) from None


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)
