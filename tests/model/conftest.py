"""Fixtures for the decoder's tests: small random Mistral checkpoints saved by transformers itself.

Until the extension has a CPU kernel for an op, the plain-torch reference (tests/ops/reference.py) stands
in for it, so the decoder is tested on the ops' contracts; real kernels take over as they land.
"""

import importlib.util
import pathlib

import pytest
import torch

from mistral_grpc import ops  # noqa: F401  (loads the extension's op registrations)

_REFERENCE_PATH = pathlib.Path(__file__).parent.parent / "ops" / "reference.py"


def _load_reference():
    spec = importlib.util.spec_from_file_location("ops_reference", _REFERENCE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _register_missing_cpu_ops() -> torch.library.Library:
    ref = _load_reference()

    def fused_add_rms_norm(x, residual, weight, eps):
        normed, new_residual = ref.fused_add_rms_norm(x, residual, weight, eps)
        residual.copy_(new_residual)
        x.copy_(normed)

    def rotary_embedding(positions, q, k, cache):
        new_q, new_k = ref.rotary_embedding(positions, q, k, cache)
        q.copy_(new_q)
        k.copy_(new_k)

    def silu_and_mul(out, gate_up):
        out.copy_(ref.silu_and_mul(gate_up))

    def paged_attention(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, window):
        out.copy_(ref.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, window))

    stand_ins = {"fused_add_rms_norm": fused_add_rms_norm, "rotary_embedding": rotary_embedding,
                 "silu_and_mul": silu_and_mul, "reshape_and_cache": ref.reshape_and_cache,
                 "paged_attention": paged_attention}
    library = torch.library.Library("mistral_grpc", "IMPL")
    for name, impl in stand_ins.items():
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"mistral_grpc::{name}", "CPU"):
            library.impl(name, impl, "CPU")
    return library


_STAND_INS = _register_missing_cpu_ops()
