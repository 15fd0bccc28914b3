"""The decoder against transformers' MistralForCausalLM on the same weights, in float32.

Every comparison recomputes transformers' logits from scratch over the whole sequence, so prefill, every
decode step, chunked prefill and batching are each checked against the plain causal model. In 16-bit
dtypes the bar is transformers' own rounding error.
"""

import copy

import pytest
import torch
from mistral_checkpoints import V01, V02, PagedRunner, hf_logits, save_random_model

from mistral_grpc.model.decoder import MistralDecoder

ATOL = 2e-4  # logits are O(1-10); float32 round-off across two different kernel orders stays far below
VARIANTS = {"v0.2": V02, "v0.1-window-8": {**V01, "sliding_window": 8}}


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 1000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=list(VARIANTS))
def models(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = save_random_model(path, **VARIANTS[request.param])
    return hf, MistralDecoder.from_dir(path)


@pytest.mark.parametrize("block_size", [16, 4])
def test_prefill_and_every_decode_step_match(models, block_size):
    hf, decoder = models
    tokens = prompt(21, seed=1)
    generated, history = PagedRunner(decoder, block_size).greedy("a", tokens, steps=32)

    for step, logits in enumerate(history):
        expected = hf_logits(hf, tokens + generated[:step])[-1]
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0, msg=f"step {step}")
    hf_generated = hf.generate(torch.tensor([tokens]), max_new_tokens=32, do_sample=False,
                               pad_token_id=0)[0, len(tokens):].tolist()
    assert generated == hf_generated


def test_batched_sequences_match_running_alone(models):
    """Different lengths, prefills and decodes in the same steps, a late joiner: each sequence's logits are
    those it gets alone (and transformers')."""
    hf, decoder = models
    prompts = {"a": prompt(5, seed=2), "b": prompt(17, seed=3), "c": prompt(30, seed=4)}
    alone = {seq: PagedRunner(decoder, block_size=4).greedy(seq, tokens, steps=6) for seq, tokens in prompts.items()}

    runner = PagedRunner(decoder, block_size=4, seed=1)
    batched: dict[str, list[torch.Tensor]] = {seq: [] for seq in prompts}
    pending = {"a": prompts["a"], "b": prompts["b"]}
    for step in range(8):
        if step == 2:
            pending["c"] = prompts["c"]  # joins while a and b decode
        for seq, logits in runner.step(pending).items():
            batched[seq].append(logits)
        pending = {seq: [alone[seq][0][len(batched[seq]) - 1]] for seq in batched
                   if 0 < len(batched[seq]) < 6}

    for seq, (generated, logits_alone) in alone.items():
        assert len(batched[seq]) == 6
        for step, (together, by_itself) in enumerate(zip(batched[seq], logits_alone)):
            torch.testing.assert_close(together, by_itself, atol=ATOL, rtol=0, msg=f"{seq} step {step}")
            expected = hf_logits(hf, prompts[seq] + generated[:step])[-1]
            torch.testing.assert_close(together, expected, atol=ATOL, rtol=0, msg=f"{seq} step {step}")


@pytest.mark.parametrize("chunks", [[10, 1, 16, 10], [4, 4, 4, 4, 4, 4, 4, 4, 4, 1]])
def test_chunked_prefill_matches_one_prefill(models, chunks):
    hf, decoder = models
    tokens = prompt(sum(chunks), seed=5)
    expected = hf_logits(hf, tokens)
    whole = PagedRunner(decoder, block_size=4).step({"a": tokens})["a"]
    torch.testing.assert_close(whole, expected[-1], atol=ATOL, rtol=0)

    runner, start = PagedRunner(decoder, block_size=4), 0
    for size in chunks:
        logits = runner.step({"a": tokens[start:start + size]})["a"]
        start += size
        torch.testing.assert_close(logits, expected[start - 1], atol=ATOL, rtol=0, msg=f"chunk ending at {start}")
    torch.testing.assert_close(logits, whole, atol=ATOL, rtol=0)


def test_a_long_prefill_matches(models):
    """A 100-token prompt in one step: fp32 batches of 80 rows and more run on AMX where the CPU has it
    (x and the weights split exactly into bf16 parts), at transformers' fp32 accuracy all the same."""
    hf, decoder = models
    tokens = prompt(100, seed=8)
    generated, history = PagedRunner(decoder, block_size=16).greedy("a", tokens, steps=3)
    for step, logits in enumerate(history):
        expected = hf_logits(hf, tokens + generated[:step])[-1]
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0, msg=f"step {step}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_strays_no_further_than_transformers(tmp_path, dtype):
    hf = save_random_model(tmp_path)
    hf_half = copy.deepcopy(hf).to(dtype)
    decoder = MistralDecoder.from_dir(tmp_path, dtype=dtype)
    assert decoder.dtype == dtype
    tokens = prompt(21, seed=6)
    generated, history = PagedRunner(decoder, block_size=4).greedy("a", tokens, steps=8)
    ours, theirs = 0.0, 0.0
    for step, logits in enumerate(history):
        exact = hf_logits(hf, tokens + generated[:step])[-1]
        ours = max(ours, float((logits - exact).abs().max()))
        theirs = max(theirs, float((hf_logits(hf_half, tokens + generated[:step])[-1] - exact).abs().max()))
    assert ours <= 1.5 * theirs


def test_dtype_choice(tmp_path):
    save_random_model(tmp_path, num_hidden_layers=1)
    assert MistralDecoder.from_dir(tmp_path).dtype == torch.float32  # config.json's
    assert MistralDecoder.from_dir(tmp_path, dtype="auto").dtype == torch.float32
    assert MistralDecoder.from_dir(tmp_path, dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        MistralDecoder.from_dir(tmp_path, dtype=torch.int8)


def test_cpu_kv_cache_is_zeroed_writable_and_per_layer(tmp_path):
    save_random_model(tmp_path, num_hidden_layers=2)
    cache = MistralDecoder.from_dir(tmp_path, dtype="bfloat16").allocate_kv_cache(num_blocks=300, block_size=16)
    tensors = cache.keys + cache.values
    assert len({t.data_ptr() for t in tensors}) == 4
    for t in tensors:
        assert t.dtype == torch.bfloat16 and t.is_contiguous() and not t.any()
        t[-1, -1].fill_(1.0)
    assert [int(t.sum()) for t in tensors] == [t.shape[-1] * t.shape[-2] for t in tensors]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_matches_cpu(tmp_path, dtype):
    """The same steps (the CPU's greedy tokens fed to both) give the same logits on either device."""
    save_random_model(tmp_path, **VARIANTS["v0.1-window-8"])
    tokens = prompt(21, seed=7)
    generated, on_cpu = PagedRunner(MistralDecoder.from_dir(tmp_path, dtype=dtype), block_size=16).greedy(
        "a", tokens, steps=8)
    cuda_runner = PagedRunner(MistralDecoder.from_dir(tmp_path, "cuda", dtype), block_size=16)
    on_cuda = [cuda_runner.step({"a": chunk})["a"] for chunk in [tokens] + [[t] for t in generated[:-1]]]
    torch.testing.assert_close(torch.stack(on_cuda), torch.stack(on_cpu),
                               atol=ATOL if dtype == torch.float32 else 0.25, rtol=0)
