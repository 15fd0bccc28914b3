"""Hugging Face safetensors checkpoints (one file, or shards named by model.safetensors.index.json)
loaded into the decoder's fused layout, every name, shape and byte range checked before a byte is copied.

Files are memory-mapped and each tensor is copied straight into its place in a preallocated destination
(its slice of a fused qkv or gate_up weight included), converting dtype on the way; the source pages are
then dropped with madvise. safetensors' own safe_open keeps every page it touched resident until the file
closes, which for a 10 GB shard of Mistral-7B v0.1 means loading at 1.7x the weights' size; this way the
peak stays at the weights plus one source tensor.
"""

import json
import math
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mistral_grpc.model.config import MistralConfig
from mistral_grpc.model.prequantized import QuantizedWeight, TensorSpec, WeightScheme, module_tensors, read_module

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype tags a checkpoint may hold: float weights, and a pre-quantized one's packed integers.
_FILE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I32": torch.int32,
                "I64": torch.int64}
# A layer's projections by the LayerWeights field they fill, in the order their rows stack there.
_PROJECTIONS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o_proj": ("self_attn.o_proj",),
                "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down_proj": ("mlp.down_proj",)}
# Old checkpoints stored this buffer; it is recomputed from rope_theta.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_HEADER_LIMIT = 100 * 1024 * 1024


class WeightsError(ValueError):
    """A checkpoint that does not hold the model its config describes."""


# A projection's weight: dense, or a pre-quantized checkpoint's values (model/prequantized.py).
Projection = torch.Tensor | QuantizedWeight


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    qkv: Projection  # [q_size + 2 * kv_size, H]: q_proj, k_proj, v_proj rows
    o_proj: Projection  # [H, q_size]
    post_attention_norm: torch.Tensor  # [H]
    gate_up: Projection  # [2 * F, H]: gate_proj rows, then up_proj rows
    down_proj: Projection  # [H, F]


@dataclass
class MistralWeights:
    embed_tokens: torch.Tensor  # [V, H]
    layers: list[Any]  # LayerWeights, or what load_weights' prepare_layer made of each
    norm: torch.Tensor  # [H]
    lm_head: Projection  # [V, H]; the embedding itself when tie_word_embeddings


@dataclass(frozen=True)
class _Entry:
    """One tensor's place in a safetensors file."""

    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def load_weights(model_dir: str | os.PathLike, config: MistralConfig, dtype: torch.dtype,
                 device: torch.device | str = "cpu",
                 prepare_layer: Callable[[LayerWeights], Any] | None = None,
                 projection_device: torch.device | str | None = None) -> MistralWeights:
    """Reads every weight of `config`'s model from `model_dir` into `dtype` on `device`; a layer's dense
    projections on `projection_device` (default `device`): the CPU when prepare_layer quantizes them
    there for another device, so they never reach it in `dtype`.

    Layers are read one at a time; with `prepare_layer` each goes through it as soon as it is read (the
    decoder packs or quantizes it there) and its dense copy can go, so the dense model need never be
    whole in memory: `layers` then holds what prepare_layer returned. In a pre-quantized checkpoint
    (config.quantization) the projections it quantizes are read as QuantizedWeight, never made dense."""
    model_dir = os.fspath(model_dir)
    entries = _read_entries(model_dir)
    device = torch.device(device)
    projection_device = device if projection_device is None else torch.device(projection_device)
    quantized_head = _quantized_modules(config, "lm_head", ("lm_head",)) if not config.tie_word_embeddings else {}
    weights, destinations = _allocate_globals(config, dtype, device, dense_head=not quantized_head)
    expected = dict(destinations)
    quantized = [_quantized_fields(config, i) for i in range(config.num_hidden_layers)]
    specs = {name: spec for fields in [quantized_head, *quantized] for modules in fields.values()
             for module in modules.values() for name, spec in module.tensors.items()}
    for i in range(config.num_hidden_layers):
        expected.update(_slots(i, _empty_layer(config, dtype, torch.device("meta"), quantized[i]), config))
    _check_against(entries, expected, specs, config)
    with _MappedFiles() as files:
        for i in range(config.num_hidden_layers):
            layer = _empty_layer(config, dtype, device, quantized[i], projection_device)
            for name, dest in sorted(_slots(i, layer, config).items(), key=lambda item: entries[item[0]].begin):
                files.copy(entries[name], dest)
            for field, modules in quantized[i].items():
                setattr(layer, field, _read_quantized(files, entries, config, modules, dtype))
            weights.layers.append(layer if prepare_layer is None else prepare_layer(layer))
        for name, dest in destinations.items():
            files.copy(entries[name], dest)
        if quantized_head:
            weights.lm_head = _read_quantized(files, entries, config, quantized_head["lm_head"], dtype)
    return weights


@dataclass(frozen=True)
class _QuantizedModule:
    """A projection a pre-quantized checkpoint quantizes: its scheme, dense shape [n, k] and tensors by name."""

    scheme: WeightScheme
    shape: tuple[int, int]
    tensors: dict[str, TensorSpec]


def _projection_shapes(config: MistralConfig) -> dict[str, tuple[int, int]]:
    h, f, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    return {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f),
            "lm_head": (config.vocab_size, h)}


def _quantized_modules(config: MistralConfig, field: str, modules: tuple[str, ...],
                       prefix: str = "") -> dict[str, dict[str, _QuantizedModule]]:
    """{field: {module: ...}} if the checkpoint quantizes `modules` (one field's), {} if it stores them
    dense; a field whose modules differ (one quantized, one dense, or two layouts) cannot be fused."""
    if config.quantization is None:
        return {}
    shapes = _projection_shapes(config)
    schemes = {module: config.quantization.scheme_for(prefix + module) for module in modules}
    if all(scheme is None for scheme in schemes.values()):
        return {}
    if len({(s.bits, s.layout_group_size) if s else None for s in schemes.values()}) > 1:
        raise WeightsError(f"{', '.join(prefix + m for m in modules)} are fused into one {field} weight but the "
                           f"quantization_config gives them different schemes: "
                           f"{', '.join(f'{prefix + m}: {s}' for m, s in schemes.items())}")
    method = config.quantization.method
    return {field: {prefix + module: _QuantizedModule(scheme, shapes[module],
                                                      module_tensors(method, prefix + module, scheme, *shapes[module]))
                    for module, scheme in schemes.items()}}


def _quantized_fields(config: MistralConfig, index: int) -> dict[str, dict[str, _QuantizedModule]]:
    """Layer `index`'s quantized fields: {field: {module: ...}}."""
    fields = {}
    for field, modules in _PROJECTIONS.items():
        fields.update(_quantized_modules(config, field, modules, prefix=f"model.layers.{index}."))
    return fields


def _read_quantized(files: "_MappedFiles", entries: dict[str, "_Entry"], config: MistralConfig,
                    modules: dict[str, _QuantizedModule], dtype: torch.dtype) -> QuantizedWeight:
    """One field's modules read from the checkpoint and stacked (q, k, v into qkv; gate, up into gate_up)."""
    parts = []
    for name, module in modules.items():
        tensors = {tensor: files.read(entries[tensor]) for tensor in module.tensors}
        try:
            parts.append(read_module(config.quantization.method, name, module.scheme, tensors, *module.shape, dtype))
        except ValueError as e:
            raise WeightsError(str(e)) from None
    return parts[0] if len(parts) == 1 else QuantizedWeight.cat(parts)


def _allocate_globals(config: MistralConfig, dtype: torch.dtype, device: torch.device,
                      dense_head: bool = True) -> tuple[MistralWeights, dict[str, torch.Tensor]]:
    """The model's tensors outside the layers, uninitialised (no layers yet; no lm_head unless `dense_head`),
    and the checkpoint name each is filled from."""

    def empty(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    h, v = config.hidden_size, config.vocab_size
    embed_tokens = empty(v, h)
    lm_head = embed_tokens if config.tie_word_embeddings else empty(v, h) if dense_head else None
    weights = MistralWeights(embed_tokens=embed_tokens, layers=[], norm=empty(h), lm_head=lm_head)
    destinations = {"model.embed_tokens.weight": embed_tokens, "model.norm.weight": weights.norm}
    if not config.tie_word_embeddings and dense_head:
        destinations["lm_head.weight"] = weights.lm_head
    return weights, destinations


def _empty_layer(config: MistralConfig, dtype: torch.dtype, device: torch.device,
                 quantized: dict[str, Any] | None = None,
                 projection_device: torch.device | None = None) -> LayerWeights:
    """A layer's dense tensors, uninitialised, the projections on `projection_device` (default `device`);
    the `quantized` fields are None until read."""
    h, f, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    quantized = quantized or {}

    def empty(*shape: int, on: torch.device = device) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=on)

    def projection(field: str, *shape: int) -> torch.Tensor | None:
        return None if field in quantized else empty(*shape, on=projection_device or device)

    return LayerWeights(empty(h), projection("qkv", q + 2 * kv, h), projection("o_proj", h, q), empty(h),
                        projection("gate_up", 2 * f, h), projection("down_proj", h, f))


def _slots(index: int, layer: LayerWeights, config: MistralConfig) -> dict[str, torch.Tensor]:
    """The checkpoint names of the layer's dense tensors (its quantized fields have none)."""
    prefix = f"model.layers.{index}."
    slots = {prefix + "input_layernorm.weight": layer.input_norm,
             prefix + "post_attention_layernorm.weight": layer.post_attention_norm}
    sizes = {"qkv": [config.q_size, config.kv_size, config.kv_size], "o_proj": [config.hidden_size],
             "gate_up": [config.intermediate_size] * 2, "down_proj": [config.hidden_size]}
    for field, modules in _PROJECTIONS.items():
        dense = getattr(layer, field)
        if dense is not None:
            slots.update({f"{prefix}{module}.weight": part for module, part in zip(modules, dense.split(sizes[field]))})
    return slots


def _check_against(entries: dict[str, _Entry], destinations: dict[str, torch.Tensor],
                   quantized: dict[str, TensorSpec], config: MistralConfig) -> None:
    wanted = [*destinations, *quantized]
    missing = [name for name in wanted if name not in entries]
    if missing:
        raise WeightsError(f"checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. {missing[:3]}")
    allowed_extra = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = [name for name in entries if name not in destinations and name not in quantized
                  and name not in allowed_extra and not name.endswith(_IGNORED_SUFFIXES)]
    if unexpected:
        raise WeightsError(f"checkpoint holds {len(unexpected)} tensor(s) the config does not describe, "
                           f"e.g. {sorted(unexpected)[:3]}: does config.json match these weights?")
    for name, dest in destinations.items():
        entry = entries[name]
        if entry.shape != tuple(dest.shape):
            raise WeightsError(f"{name} in {entry.path}: shape {list(entry.shape)}, config.json implies "
                               f"{list(dest.shape)}")
        if not entry.dtype.is_floating_point:
            raise WeightsError(f"{name} in {entry.path} is {entry.dtype}, not a float weight: is the checkpoint "
                               "quantized without a quantization_config in config.json?")
    for name, spec in quantized.items():
        entry = entries[name]
        if entry.shape != spec.shape or entry.dtype not in spec.dtypes:
            raise WeightsError(f"{name} in {entry.path}: {entry.dtype} {list(entry.shape)}, the quantization_config "
                               f"implies {' or '.join(map(str, spec.dtypes))} {list(spec.shape)}")


def _read_entries(model_dir: str) -> dict[str, _Entry]:
    """Headers of the checkpoint's files, by tensor name."""
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return _read_header(single)
    index_path = os.path.join(model_dir, INDEX_FILE)
    if not os.path.isfile(index_path):
        raise WeightsError(f"{model_dir!r} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise WeightsError(f"{index_path}: not a safetensors index ({e})") from None
    entries: dict[str, _Entry] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(model_dir, shard)
        if not os.path.isfile(shard_path):
            raise WeightsError(f"{index_path} names shard {shard!r}, which is not in {model_dir!r}")
        header = _read_header(shard_path)
        for name, file in weight_map.items():
            if file == shard and name not in header:
                raise WeightsError(f"{index_path} puts {name} in {shard}, which does not hold it")
        entries.update(header)
    return entries


def _read_header(path: str) -> dict[str, _Entry]:
    """The tensors of one safetensors file, checked against the file's real size (truncation shows here)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise WeightsError(f"{path}: truncated ({size} bytes), not a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _HEADER_LIMIT):
            raise WeightsError(f"{path}: header of {header_len} bytes does not fit the file ({size} bytes): "
                               "truncated or not a safetensors file")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: safetensors header is not an object")
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_tag, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: malformed header entry for {name}: {info!r}") from None
        if not all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end)):
            raise WeightsError(f"{path}: malformed header entry for {name}: {info!r}")
        if dtype_tag not in _FILE_DTYPES:
            raise WeightsError(f"{path}: {name} is {dtype_tag}; expected one of {sorted(_FILE_DTYPES)}")
        dtype = _FILE_DTYPES[dtype_tag]
        if end - begin != dtype.itemsize * math.prod(shape):
            raise WeightsError(f"{path}: {name}'s byte range {begin}..{end} does not hold a {dtype_tag} "
                               f"tensor of shape {list(shape)}")
        if data_start + end > size:
            raise WeightsError(f"{path}: truncated: {name} ends at byte {data_start + end}, "
                               f"the file has {size}")
        entries[name] = _Entry(path, dtype, shape, data_start + begin, data_start + end)
    return entries


class _MappedFiles:
    """The checkpoint's files, each memory-mapped once, copied from tensor by tensor; a copied tensor's
    source pages leave our resident set at once."""

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}

    def __enter__(self) -> "_MappedFiles":
        return self

    def __exit__(self, *exc: object) -> None:
        for mapped in self._maps.values():
            try:
                mapped.close()
            except BufferError:
                pass  # a failed copy's traceback still views the map; it is unmapped when that view dies

    def copy(self, entry: _Entry, dest: torch.Tensor) -> None:
        mapped = self._maps.get(entry.path)
        if mapped is None:
            with open(entry.path, "rb") as f:
                # ACCESS_COPY (a private mapping) is writable, which torch.frombuffer needs to not warn;
                # nothing writes to it, so no page is ever copied.
                mapped = self._maps[entry.path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        _copy_entry(mapped, entry, dest)
        # Drop the copied pages from our resident set (the first may hold the end of the previous
        # tensor); the page cache keeps them, so this costs no re-reading.
        page = mmap.PAGESIZE
        released_start = entry.begin - entry.begin % page
        mapped.madvise(mmap.MADV_DONTNEED, released_start, entry.end - released_start)

    def read(self, entry: _Entry) -> torch.Tensor:
        """A new CPU tensor holding the entry (a pre-quantized checkpoint's packed tensors, as stored)."""
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        self.copy(entry, tensor)
        return tensor


def _copy_entry(mapped: mmap.mmap, entry: _Entry, dest: torch.Tensor) -> None:
    # The view must not outlive this call: mmap.close() refuses while a buffer export is alive.
    source = torch.frombuffer(mapped, dtype=entry.dtype, count=math.prod(entry.shape), offset=entry.begin)
    dest.copy_(source.view(entry.shape))
