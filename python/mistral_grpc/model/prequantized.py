"""Pre-quantized checkpoints: compressed-tensors `pack-quantized` (what llm-compressor writes) and AWQ GEMM,
detected from config.json's quantization_config and read, projection by projection, into the values the CPU
kernels' packs hold (ops.pack_quantized_weight, csrc/common/quant.h): q uint8 [N, K] and, per output row and
group of K, a scale and a zero point, the weight being exactly (q - zero) * scale.

Every format read here fits that layout exactly (scales aside: they are stored as fp16, so bf16 and fp16
scales are exact and fp32 ones round to the nearest fp16). What does not fit (int8 with groups along K,
act-order GPTQ, fp8, activation quantization, ...) is refused by name; nothing loads as dense instead.

  compressed-tensors: weight_packed int32 [N, ceil(K * bits / 32)], 32 / bits values per int32, lowest
    bits first, each stored as value + 2^(bits - 1); weight_scale [N, K / G] (per channel [N, 1]);
    weight_shape [N, K]; asymmetric: weight_zero_point int32 [ceil(N * bits / 32), K / G], packed the same
    way along N. Symmetric: the zero point is 2^(bits - 1) in the stored (unsigned) values.
  AWQ GEMM: qweight int32 [K, N / 8] and qzeros int32 [K / G, N / 8], nibble i (bits 4i..4i+3) of word c
    holding column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]; scales fp16 [K / G, N].

A source group of G values along K becomes the layout's groups of g = 128, 64 or 32 (the largest that
divides G; per channel: 128), each repeating its source group's scale and zero point, which is exact.
"""

import math
import re
from dataclasses import dataclass, replace
from typing import Any

import torch

SUPPORTED = ("compressed-tensors pack-quantized weight-only int4 (W4A16) or int8 (W8A16), group or channel "
             "strategy, symmetric or not; AWQ GEMM 4-bit with zero points")

# The layout's int4 group sizes, largest first.
_LAYOUT_GROUPS = (128, 64, 32)
# AWQ GEMM: the column of word c's nibble i is 8c + _AWQ_ORDER[i]; _AWQ_COLUMNS undoes it.
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_COLUMNS = [_AWQ_ORDER.index(column) for column in range(8)]
_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class QuantizationConfigError(ValueError):
    """A quantization_config that cannot load; `field` names the culprit under quantization_config."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class WeightScheme:
    bits: int  # 4 or 8
    group_size: int | None  # K values per scale; None: one scale per output channel
    symmetric: bool

    @property
    def layout_group_size(self) -> int:
        """The pack's group_size argument: 0 for int8 (one group per row), else the layout's group."""
        if self.bits == 8:
            return 0
        if self.group_size is None:
            return _LAYOUT_GROUPS[0]
        return next(g for g in _LAYOUT_GROUPS if self.group_size % g == 0)


@dataclass(frozen=True)
class PrequantizedConfig:
    """What quantization_config says: the method, the scheme of each target, the modules left dense."""

    method: str  # "compressed-tensors" or "awq"
    schemes: tuple[tuple[tuple[str, ...], WeightScheme], ...]  # (targets, scheme), first match wins
    ignore: tuple[str, ...]

    def scheme_for(self, module: str) -> WeightScheme | None:
        """The scheme of a linear module (e.g. "model.layers.0.mlp.down_proj"); None: stored dense."""
        if any(_matches(self.method, pattern, module) for pattern in self.ignore):
            return None
        return next((scheme for targets, scheme in self.schemes
                     if any(_matches(self.method, target, module) for target in targets)), None)

    def describe(self) -> str:
        """For the startup log, e.g. "compressed-tensors int4 group 128 asymmetric"."""
        kinds = sorted({(s.bits, s.group_size or 0, s.symmetric) for _, s in self.schemes})
        return self.method + " " + ", ".join(
            f"int{bits} {f'group {group}' if group else 'per channel'} {'symmetric' if sym else 'asymmetric'}"
            for bits, group, sym in kinds)


def _matches(method: str, target: str, module: str) -> bool:
    # The class name "Linear" (every projection is one); compressed-tensors: "re:<regex>" (re.match) or the
    # module's name; AWQ's modules_to_not_convert: a part of the module's name.
    if target == "Linear":
        return True
    if method == "awq":
        return target in module
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module


def parse_quantization_config(value: Any) -> PrequantizedConfig:
    """Raises QuantizationConfigError for every method and option the layout cannot hold exactly."""
    if not isinstance(value, dict):
        raise QuantizationConfigError("quant_method", f"expected an object, got {value!r}")
    method = value.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(value)
    if method == "awq":
        return _awq(value)
    detail = " with act-order (desc_act)" if method == "gptq" and value.get("desc_act") else ""
    raise QuantizationConfigError("quant_method", f"{method!r}{detail} checkpoints do not load; supported: {SUPPORTED}")


def _refuse(field: str, what: str) -> QuantizationConfigError:
    return QuantizationConfigError(field, f"{what} does not load; supported: {SUPPORTED}")


def _compressed_tensors(value: dict[str, Any]) -> PrequantizedConfig:
    fmt = value.get("format")
    status = value.get("quantization_status", "compressed")
    if status != "compressed":
        raise _refuse("quantization_status", f"compressed-tensors with quantization_status {status!r} (not compressed)")
    for field in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if value.get(field):
            raise _refuse(field, f"compressed-tensors with a {field} ({value[field]!r})")
    groups = value.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise QuantizationConfigError("config_groups", f"expected a non-empty object, got {groups!r}")
    schemes = []
    for name, group in groups.items():
        field = f"config_groups.{name}"
        if not isinstance(group, dict):
            raise QuantizationConfigError(field, f"expected an object, got {group!r}")
        group_format = group.get("format") or fmt
        if group_format != "pack-quantized":
            raise _refuse(f"{field}.format", f"compressed-tensors format {group_format!r}")
        for activations in ("input_activations", "output_activations"):
            if group.get(activations):
                raise _refuse(f"{field}.{activations}", "compressed-tensors activation quantization (e.g. W8A8)")
        targets = group.get("targets")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise QuantizationConfigError(f"{field}.targets", f"expected a list of names, got {targets!r}")
        schemes.append((tuple(targets), _compressed_tensors_weights(f"{field}.weights", group.get("weights"))))
    return PrequantizedConfig("compressed-tensors", tuple(schemes), _names(value, "ignore"))


def _compressed_tensors_weights(field: str, weights: Any) -> WeightScheme:
    if not isinstance(weights, dict):
        raise _refuse(field, f"compressed-tensors without weight quantization ({weights!r})")
    kind, bits, strategy = weights.get("type"), weights.get("num_bits"), weights.get("strategy")
    if kind != "int" or bits not in (4, 8):
        raise _refuse(field, f"compressed-tensors {kind}{bits} weights")
    if weights.get("dynamic"):
        raise _refuse(f"{field}.dynamic", "compressed-tensors dynamic weight quantization")
    if weights.get("actorder") not in (None, False, "static", "weight"):
        raise _refuse(f"{field}.actorder", f"compressed-tensors act-order GPTQ (actorder {weights['actorder']!r})")
    symmetric = weights.get("symmetric", True)
    if strategy == "channel":
        return WeightScheme(bits, None, bool(symmetric))
    group_size = weights.get("group_size")
    if strategy != "group":
        raise _refuse(f"{field}.strategy", f"compressed-tensors strategy {strategy!r}")
    if bits == 8:
        raise _refuse(f"{field}.strategy", f"compressed-tensors int8 in groups of {group_size} "
                                           "(int8 holds one scale per output channel)")
    if not isinstance(group_size, int) or group_size <= 0 or group_size % _LAYOUT_GROUPS[-1]:
        raise _refuse(f"{field}.group_size", f"compressed-tensors int4 in groups of {group_size!r} "
                                             "(the group must be a multiple of 32)")
    return WeightScheme(bits, group_size, bool(symmetric))


def _awq(value: dict[str, Any]) -> PrequantizedConfig:
    version = str(value.get("version", "gemm")).lower()
    if version != "gemm":
        raise _refuse("version", f"AWQ version {version!r}")
    bits = value.get("bits", value.get("w_bit"))
    if bits != 4:
        raise _refuse("bits", f"AWQ with {bits!r} bits")
    if not value.get("zero_point", True):
        raise _refuse("zero_point", "AWQ without zero points")
    group_size = value.get("group_size", value.get("q_group_size"))
    if not isinstance(group_size, int) or group_size <= 0 or group_size % _LAYOUT_GROUPS[-1]:
        raise _refuse("group_size", f"AWQ in groups of {group_size!r} (the group must be a multiple of 32)")
    # AWQ quantizes the decoder layers' projections, never the LM head.
    return PrequantizedConfig("awq", ((("Linear",), WeightScheme(4, group_size, False)),),
                              ("lm_head", *_names(value, "modules_to_not_convert")))


def _names(value: dict[str, Any], field: str) -> tuple[str, ...]:
    names = value.get(field) or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise QuantizationConfigError(field, f"expected a list of module names, got {names!r}")
    return tuple(names)


@dataclass
class QuantizedWeight:
    """One projection's (or fused projections') quantized values, as ops.pack_quantized_weight takes them."""

    q: torch.Tensor  # uint8 [N, K]
    scale: torch.Tensor  # [N, groups]: float32, bfloat16 or float16
    zero: torch.Tensor  # uint8 [N, groups]
    bits: int
    group_size: int  # the pack's: 0 for int8, else 32, 64 or 128
    activation: torch.dtype  # the dtype of x and out

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def chunk(self, chunks: int) -> list["QuantizedWeight"]:
        """Row blocks, as Tensor.chunk (the fused gate_up's gate and up)."""
        return [replace(self, q=q, scale=s, zero=z)
                for q, s, z in zip(self.q.chunk(chunks), self.scale.chunk(chunks), self.zero.chunk(chunks))]

    @staticmethod
    def cat(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """The parts' rows stacked (q, k, v into qkv); they must share bits and group size."""
        first = parts[0]
        return replace(first, q=torch.cat([p.q for p in parts]), scale=torch.cat([p.scale for p in parts]),
                       zero=torch.cat([p.zero for p in parts]))


@dataclass(frozen=True)
class TensorSpec:
    """A quantized tensor a module needs from the checkpoint: its shape and the dtypes it may have."""

    shape: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]


def module_tensors(method: str, module: str, scheme: WeightScheme, n: int, k: int) -> dict[str, TensorSpec]:
    """The checkpoint's tensors of a quantized module whose dense weight is [n, k], by name."""
    int32 = (torch.int32,)
    if method == "awq":
        groups = math.ceil(k / scheme.group_size)
        return {f"{module}.qweight": TensorSpec((k, _ceil_div(n, 8)), int32),
                f"{module}.qzeros": TensorSpec((groups, _ceil_div(n, 8)), int32),
                f"{module}.scales": TensorSpec((groups, n), _SCALE_DTYPES)}
    groups = 1 if scheme.group_size is None else math.ceil(k / scheme.group_size)
    specs = {f"{module}.weight_packed": TensorSpec((n, _ceil_div(k * scheme.bits, 32)), int32),
             f"{module}.weight_scale": TensorSpec((n, groups), _SCALE_DTYPES),
             f"{module}.weight_shape": TensorSpec((2,), (torch.int64, torch.int32))}
    if not scheme.symmetric:
        specs[f"{module}.weight_zero_point"] = TensorSpec((_ceil_div(n * scheme.bits, 32), groups), int32)
    return specs


def read_module(method: str, module: str, scheme: WeightScheme, tensors: dict[str, torch.Tensor], n: int, k: int,
                activation: torch.dtype) -> QuantizedWeight:
    """One module's tensors (named as module_tensors says, shapes checked) as the layout's values."""
    if method == "awq":
        q = _awq_columns(tensors[f"{module}.qweight"], n).t().contiguous()
        zero = _awq_columns(tensors[f"{module}.qzeros"], n).t()
        scale = tensors[f"{module}.scales"].t()
    else:
        shape = tensors[f"{module}.weight_shape"].tolist()
        if shape != [n, k]:
            raise ValueError(f"{module}.weight_shape is {shape}, config.json implies {[n, k]}")
        q = _unpack_rows(tensors[f"{module}.weight_packed"], scheme.bits, k)
        scale = tensors[f"{module}.weight_scale"]
        if scheme.symmetric:
            zero = torch.full(scale.shape, 1 << (scheme.bits - 1), dtype=torch.uint8)
        else:
            zero = _unpack_rows(tensors[f"{module}.weight_zero_point"].t(), scheme.bits, n).t()
    columns = _layout_columns(scheme, k)
    return QuantizedWeight(q, scale[:, columns].contiguous(), zero[:, columns].contiguous(), scheme.bits,
                           scheme.layout_group_size, activation)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _unpack_rows(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """uint8 [R, count] from int32 [R, ceil(count * bits / 32)] holding 32 / bits values a word, lowest first."""
    data = packed.contiguous().view(torch.uint8)  # little-endian: byte i of a word holds its lowest bits first
    if bits == 4:
        data = torch.stack([data & 0xF, data >> 4], dim=-1).flatten(-2)
    return data[:, :count]


def _awq_columns(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [R, n] from AWQ's int32 [R, n / 8], its interleaved nibble order undone."""
    values = _unpack_rows(packed, 4, packed.shape[1] * 8)
    return values.view(values.shape[0], -1, 8)[:, :, _AWQ_COLUMNS].flatten(1)[:, :n]


def _layout_columns(scheme: WeightScheme, k: int) -> torch.Tensor:
    """For each of the layout's groups along K, the source group (a column of scale and zero) it lies in."""
    if scheme.bits == 8 or scheme.group_size is None:
        return torch.zeros(1 if scheme.bits == 8 else _ceil_div(k, _LAYOUT_GROUPS[0]), dtype=torch.long)
    layout_group = scheme.layout_group_size
    return torch.arange(_ceil_div(k, layout_group)) * layout_group // scheme.group_size
