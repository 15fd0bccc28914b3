"""The decoder's linear layers: the extension's weight-streaming kernels on CPU, cuBLAS on CUDA.

With a quantization scheme (int8, int4) the CPU weight is quantized while it is packed
(ops.quantize_linear_weight) and the same ops run it on int8 dot products (csrc/common/quant.h).

A CPU decode step reads every weight once, so its speed is the rate the weights stream through
the cores: ops.linear reads a weight packed once at load time at close to the machine's read
bandwidth (benchmarks/bench_linear.py). On CPU every batch size goes to our ops, which switch
to AMX for bf16 batches of 7 rows and more and for fp32 batches of 80 and more (through exact bf16
parts); the engine's decoder picks the kernels per row instead (prompt_rows), so that a row's result
never depends on the rest of the batch. (MKL's batched GEMM on the packed fp32 tiles was no faster than
our FMA kernels: docs/performance.md.) On CUDA the weight is kept as is for cuBLAS.
"""

import torch
import torch.nn.functional as F

from mistral_grpc import ops
from mistral_grpc.model.prequantized import PrequantizedConfig, QuantizedWeight


# The dtypes our CPU kernels stream; others (float16 on CPU) and every CUDA weight go to torch.
_PACKABLE = (torch.float32, torch.bfloat16)

# Weight-only quantization schemes (--quantization): "none" keeps the model's dtype.
QUANTIZATION_SCHEMES = ("none", "int8", "int4")


class QuantizationError(ValueError):
    """A scheme that cannot run where it was asked for."""


def _packs(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype in _PACKABLE


def check_quantization(scheme: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """Raises QuantizationError unless the kernels exist for `scheme` on `device` in `dtype`."""
    if scheme not in QUANTIZATION_SCHEMES:
        raise QuantizationError(f"quantization must be one of {', '.join(QUANTIZATION_SCHEMES)}, got {scheme!r}")
    if scheme != "none":
        _check_quantized_kernels(f"--quantization {scheme}", device, dtype)


def check_prequantized(checkpoint: PrequantizedConfig, scheme: str, device: torch.device | str,
                       dtype: torch.dtype) -> None:
    """Raises QuantizationError unless a pre-quantized checkpoint runs as asked (as quantized, on the CPU)."""
    if scheme != "none":
        raise QuantizationError(f"the checkpoint is already quantized ({checkpoint.method}): --quantization must be "
                                f"none, got {scheme!r}")
    _check_quantized_kernels(f"a pre-quantized ({checkpoint.method}) checkpoint", device, dtype)


def _check_quantized_kernels(what: str, device: torch.device | str, dtype: torch.dtype) -> None:
    if torch.device(device).type != "cpu":
        raise QuantizationError(f"{what} runs on the CPU only so far (got --device {device})")
    if dtype not in _PACKABLE:
        raise QuantizationError(f"{what} needs --dtype float32 or bfloat16 on the CPU "
                                f"(the activations' dtype), got {str(dtype).removeprefix('torch.')}")


class _Projection:
    """Packed weight and our op on CPU (float32, bfloat16); the dense weight and torch otherwise."""

    def __init__(self, out_features: int, in_features: int, *, packed: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None) -> None:
        self.out_features = out_features
        self.in_features = in_features
        self.packed = packed  # CPU: the only copy of the weight
        self.weight = weight  # CUDA: the dense weight, for cuBLAS

    @property
    def nbytes(self) -> int:
        """The bytes the layer's weight takes in memory."""
        return (self.packed if self.packed is not None else self.weight).nbytes

    def _kernel(self, out: torch.Tensor, x: torch.Tensor, prompt_rows: int) -> None:
        raise NotImplementedError

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None,
                 prompt_rows: int = ops.KERNELS_BY_BATCH_SIZE) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x's dtype (which must be the weight's),
        written into `out` if given; prompt_rows as for ops.linear (CPU only)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected x [..., {self.in_features}], got {tuple(x.shape)}")
        # 2-D x (the decoder's [T, K], some 30 calls a decode step) goes through without reshapes or
        # views, which cost more than the small calls' kernels.
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        shape = (*x.shape[:-1], self.out_features)
        if self.packed is None:
            y = self._torch(rows).view(shape)
            return y if out is None else out.copy_(y)
        out = torch.empty(shape, dtype=x.dtype) if out is None else out
        self._kernel(out if out.dim() == 2 else out.view(-1, self.out_features),
                     rows if rows.stride(-1) == 1 else rows.contiguous(), prompt_rows)
        return out


class Linear(_Projection):
    """y = x @ weight.T for an nn.Linear-layout weight [N, K] (no bias, as in Mistral). The decoder's
    qkv is one of these over the concatenated q, k, v weights."""

    @classmethod
    def from_weight(cls, weight: torch.Tensor | QuantizedWeight, quantization: str = "none") -> "Linear":
        """A pre-quantized checkpoint's QuantizedWeight is packed as it is (`quantization` is not applied)."""
        n, k = weight.shape
        if isinstance(weight, QuantizedWeight):
            return cls(n, k, packed=ops.pack_quantized_weight(weight.q, weight.scale, weight.zero, weight.bits,
                                                              weight.group_size, weight.activation))
        if quantization != "none":
            check_quantization(quantization, weight.device, weight.dtype)
            return cls(n, k, packed=ops.quantize_linear_weight(weight, quantization))
        if _packs(weight):
            return cls(n, k, packed=ops.pack_linear_weight(weight))
        return cls(n, k, weight=weight)

    def _kernel(self, out: torch.Tensor, x: torch.Tensor, prompt_rows: int) -> None:
        ops.linear(out, x, self.packed, prompt_rows)

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class GateUpSilu(_Projection):
    """The Mistral MLP's first half: silu(x @ gate.T) * (x @ up.T) for gate, up [F, K]. On CPU one
    op reads the packed gate+up weight and writes [T, F] without materialising [T, 2F]."""

    @classmethod
    def from_weights(cls, gate: torch.Tensor | QuantizedWeight, up: torch.Tensor | QuantizedWeight,
                     quantization: str = "none") -> "GateUpSilu":
        if gate.shape != up.shape:
            raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
        f, k = gate.shape
        if isinstance(gate, QuantizedWeight):
            return cls(f, k, packed=ops.pack_quantized_gate_up_weight(gate.q, gate.scale, gate.zero, up.q, up.scale,
                                                                      up.zero, gate.bits, gate.group_size,
                                                                      gate.activation))
        if quantization != "none":
            check_quantization(quantization, gate.device, gate.dtype)
            return cls(f, k, packed=ops.quantize_gate_up_weight(gate, up, quantization))
        if _packs(gate):
            return cls(f, k, packed=ops.pack_gate_up_weight(gate, up))
        return cls(f, k, weight=torch.cat([gate, up]))

    def _kernel(self, out: torch.Tensor, x: torch.Tensor, prompt_rows: int) -> None:
        ops.linear_silu_mul(out, x, self.packed, prompt_rows)

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = F.linear(x, self.weight)
        out = gate_up.new_empty(gate_up.shape[0], self.out_features)
        ops.silu_and_mul(out, gate_up)
        return out
