"""The decoder's linear layers: the extension's weight-streaming kernels on CPU, cuBLAS on CUDA.

With a quantization scheme (int8, int4) the weight is quantized on the CPU while it is packed
(ops.quantize_linear_weight) and the same ops run it: on the CPU on int8 dot products, on CUDA (the pack
moved there as it is) weight-only kernels (csrc/common/quant.h, csrc/cuda/linear_quant.cu).

A CPU decode step reads every weight once, so its speed is the rate the weights stream through
the cores: ops.linear reads a weight packed once at load time at close to the machine's read
bandwidth (benchmarks/bench_linear.py). On CPU every batch size goes to our ops, which switch
to AMX for bf16 batches of 7 rows and more and for fp32 batches of 80 and more (through exact bf16
parts); the engine's decoder picks the kernels per row instead (prompt_rows), so that a row's result
never depends on the rest of the batch. (MKL's batched GEMM on the packed fp32 tiles was no faster than
our FMA kernels: docs/performance.md.) On CUDA a float weight is kept as is for cuBLAS.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mistral_grpc import ops
from mistral_grpc.model.prequantized import PrequantizedConfig, QuantizedWeight


# The dtypes our CPU kernels stream; others (float16 on CPU) and every float CUDA weight go to torch.
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


def cuda_quantized_kernels_built() -> bool:
    """Whether the extension was built with its CUDA kernels (nvcc at build time), the quantized ones included."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("mistral_grpc::linear", "CUDA")


def check_cuda_quantized_kernels(what: str) -> None:
    """Raises QuantizationError unless the extension has its CUDA kernels (for every activation dtype:
    float32, bfloat16 and float16)."""
    if not cuda_quantized_kernels_built():
        raise QuantizationError(f"{what} on CUDA needs the extension built with its CUDA kernels "
                                f"(this build has the CPU's only)")


def _check_quantized_kernels(what: str, device: torch.device | str, dtype: torch.dtype) -> None:
    device_type = torch.device(device).type
    if device_type == "cuda":
        check_cuda_quantized_kernels(what)
        return
    if device_type != "cpu":
        raise QuantizationError(f"{what} runs on the CPU and CUDA only (got --device {device})")
    if dtype not in _PACKABLE:
        raise QuantizationError(f"{what} needs --dtype float32 or bfloat16 on the CPU "
                                f"(the activations' dtype), got {str(dtype).removeprefix('torch.')}")


def _quantized_pack(make: Callable[[torch.dtype], torch.Tensor], device: torch.device | str,
                    dtype: torch.dtype) -> torch.Tensor:
    """A quantized pack for x and out of `dtype` on `device`. make(activation) packs on the CPU for an
    activation the CPU ops take: float16 (CUDA only) goes through float32, which holds its weights exactly,
    and is then named in the header. The pack moves to `device` as a whole: its bytes are the same there."""
    packed = make(torch.float32 if dtype == torch.float16 else dtype)
    if dtype == torch.float16:
        packed = ops.with_activation(packed, dtype)
    return packed.to(device)


class _Projection:
    """Packed weight and our op on CPU (float32, bfloat16), and for quantized weights on CUDA too; the
    dense weight and torch otherwise."""

    def __init__(self, out_features: int, in_features: int, *, packed: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None) -> None:
        self.out_features = out_features
        self.in_features = in_features
        self.packed = packed  # CPU, or quantized on CUDA: the only copy of the weight
        self.weight = weight  # float on CUDA (float16 on CPU): the dense weight, for torch

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
        written into `out` if given; prompt_rows as for ops.linear (CPU only: CUDA checks it, no more)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected x [..., {self.in_features}], got {tuple(x.shape)}")
        # 2-D x (the decoder's [T, K], some 30 calls a decode step) goes through without reshapes or
        # views, which cost more than the small calls' kernels.
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        shape = (*x.shape[:-1], self.out_features)
        if self.packed is None:
            y = self._torch(rows).view(shape)
            return y if out is None else out.copy_(y)
        out = torch.empty(shape, dtype=x.dtype, device=x.device) if out is None else out
        self._kernel(out if out.dim() == 2 else out.view(-1, self.out_features),
                     rows if rows.stride(-1) == 1 else rows.contiguous(), prompt_rows)
        return out


class Linear(_Projection):
    """y = x @ weight.T for an nn.Linear-layout weight [N, K] (no bias, as in Mistral). The decoder's
    qkv is one of these over the concatenated q, k, v weights."""

    @classmethod
    def from_weight(cls, weight: torch.Tensor | QuantizedWeight, quantization: str = "none",
                    device: torch.device | str = "cpu") -> "Linear":
        """A pre-quantized checkpoint's QuantizedWeight (CPU tensors) is packed as it is (`quantization` is not
        applied), and a float weight with `quantization` quantized on the CPU; either pack moves to `device`.
        An unquantized float weight's layer stays on the weight's device."""
        n, k = weight.shape
        if isinstance(weight, QuantizedWeight):
            return cls(n, k, packed=_quantized_pack(
                lambda activation: ops.pack_quantized_weight(weight.q, weight.scale, weight.zero, weight.bits,
                                                             weight.group_size, activation),
                device, weight.activation))
        if quantization != "none":
            check_quantization(quantization, device, weight.dtype)
            return cls(n, k, packed=_quantized_pack(
                lambda activation: ops.quantize_linear_weight(weight.to("cpu", activation), quantization),
                device, weight.dtype))
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
                     quantization: str = "none", device: torch.device | str = "cpu") -> "GateUpSilu":
        """`device` as for Linear.from_weight."""
        if gate.shape != up.shape:
            raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
        f, k = gate.shape
        if isinstance(gate, QuantizedWeight):
            return cls(f, k, packed=_quantized_pack(
                lambda activation: ops.pack_quantized_gate_up_weight(gate.q, gate.scale, gate.zero, up.q, up.scale,
                                                                     up.zero, gate.bits, gate.group_size, activation),
                device, gate.activation))
        if quantization != "none":
            check_quantization(quantization, device, gate.dtype)
            return cls(f, k, packed=_quantized_pack(
                lambda activation: ops.quantize_gate_up_weight(gate.to("cpu", activation), up.to("cpu", activation),
                                                               quantization),
                device, gate.dtype))
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
