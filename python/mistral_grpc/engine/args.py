"""How to build an engine: the model, where it runs and how much it may hold (the serve flags)."""

from dataclasses import dataclass

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'4GiB', '512MiB', '2gb', '1000000' -> bytes."""
    cleaned = text.strip().lower().replace(" ", "")
    number = cleaned.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = cleaned[len(number):]
    if unit not in _UNITS or not number:
        raise ValueError(f"not a size: {text!r} (use e.g. 512MiB, 4GiB or a number of bytes)")
    return int(float(number) * _UNITS[unit])


@dataclass(frozen=True)
class EngineArgs:
    model: str = "demo"  # a Hugging Face model directory, or "demo"
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    quantization: str = "none"  # none | int8 | int4: weight-only, applied while loading (CPU)
    served_model_name: str | None = None  # defaults to the directory's name ("demo" for the demo)
    max_batch_size: int = 32  # sequences decoded together in one step
    max_queue: int = 256  # waiting requests beyond this are refused (RESOURCE_EXHAUSTED)
    kv_cache_memory: int | None = None  # bytes for the KV cache; None = a default share of free memory
    block_size: int = 16  # tokens per KV cache block
    max_prefill_tokens: int = 512  # chunked prefill: prompt tokens per step, so decodes keep flowing
    speculative_tokens: int = 8  # draft tokens a sequence verifies per step at most; 0 = no speculation
    # Draft from the prompt and the reply so far when a request has no prediction (it measured faster in
    # float32 and bfloat16 even on random weights, where few drafts are right: docs/speculative.md).
    prompt_lookup: bool = True
