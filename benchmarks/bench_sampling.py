"""Sampling a [64, 32000] batch on CPU: the extension's ops against the same work in plain torch ops.

    PYTHONPATH=python python benchmarks/bench_sampling.py [--rows 64] [--vocab 32000] [--repeats 20] [--threads N]

The plain-torch versions follow the usual recipe (vLLM's, Hugging Face's): sort, cumsum, mask,
torch.multinomial; penalties by scatter / bincount.
"""

import argparse
import time
from collections.abc import Callable

import torch

from mistral_grpc import ops


def torch_sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Skips the work a batch does not need, as serving engines do: no sort without top-k / top-p."""
    logprobs = torch.log_softmax(logits, -1)
    tokens = logits.argmax(-1)
    if not bool((temperature == 0).all()):
        probs = torch.softmax(logits / temperature.clamp(min=1e-6)[:, None], -1)
        if bool((top_k > 0).any() or (top_p < 1).any()):
            probs = torch_top_k_top_p(probs, top_p, top_k)
        drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        tokens = torch.where(temperature == 0, tokens, drawn)
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)


def torch_top_k_top_p(probs: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    values, order = probs.sort(-1, descending=True)
    vocab = probs.shape[1]
    kth = values.gather(1, (torch.where(top_k > 0, top_k, vocab) - 1).clamp(max=vocab - 1)[:, None])
    values = values.masked_fill(values < kth, 0.0)
    values = values / values.sum(-1, keepdim=True)
    outside_p = values.cumsum(-1) - values >= top_p[:, None]  # the mass before a token already reaches top_p
    return torch.zeros_like(probs).scatter_(1, order, values.masked_fill(outside_p, 0.0))


def torch_penalties(logits: torch.Tensor, prompt: torch.Tensor, output: torch.Tensor, repetition: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor) -> None:
    rows, vocab = logits.shape
    # Column `vocab` collects the -1 padding.
    def counts_of(tokens: torch.Tensor) -> torch.Tensor:
        index = torch.where(tokens < 0, vocab, tokens)
        return torch.zeros(rows, vocab + 1, dtype=torch.int64).scatter_add_(1, index, torch.ones_like(index))[:, :vocab]

    output_counts = counts_of(output)
    seen = (counts_of(prompt) + output_counts) > 0
    rep = repetition[:, None].expand_as(logits)
    logits.copy_(torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits))
    logits -= output_counts * frequency[:, None] + (output_counts > 0) * presence[:, None]


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` runs: on a shared machine the others mostly measure the neighbours."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    rows, vocab = args.rows, args.vocab
    torch.set_num_threads(args.threads)
    logits = torch.randn(rows, vocab) * 3
    seeds, offsets = torch.arange(rows), torch.zeros(rows, dtype=torch.int64)
    tokens, logprobs = torch.empty(rows, dtype=torch.int64), torch.empty(rows)
    generator = torch.Generator().manual_seed(0)

    cases = [  # name, temperature, top_p, top_k
        ("greedy", 0.0, 1.0, 0),
        ("temperature 0.8", 0.8, 1.0, 0),
        ("top_k 50", 0.8, 1.0, 50),
        ("top_p 0.9", 0.8, 0.9, 0),
        ("top_k 50 + top_p 0.9", 0.8, 0.9, 50),
    ]
    print(f"sample: [{rows}, {vocab}] fp32 logits on CPU, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'case':<24}{'extension ms':>14}{'plain torch ms':>16}{'speed-up':>10}")
    for name, t, p, k in cases:
        temperature, top_p, top_k = torch.full((rows,), t), torch.full((rows,), p), torch.full((rows,), k)
        ours = best_ms(lambda: ops.sample(logits, temperature, top_p, top_k, seeds, offsets, tokens, logprobs),
                         args.repeats)
        theirs = best_ms(lambda: torch_sample(logits, temperature, top_p, top_k, generator), args.repeats)
        print(f"{name:<24}{ours:>14.2f}{theirs:>16.2f}{theirs / ours:>9.1f}x")

    prompt = torch.randint(0, vocab, (rows, 1024))
    output = torch.randint(0, vocab, (rows, 256))
    repetition, presence, frequency = torch.full((rows,), 1.1), torch.full((rows,), 0.5), torch.full((rows,), 0.2)
    work = logits.clone()
    ours = best_ms(lambda: ops.apply_penalties(work, prompt, output, repetition, presence, frequency), args.repeats)
    theirs = best_ms(lambda: torch_penalties(work, prompt, output, repetition, presence, frequency), args.repeats)
    print(f"{'penalties 1024+256 ids':<24}{ours:>14.2f}{theirs:>16.2f}{theirs / ours:>9.1f}x")


if __name__ == "__main__":
    main()
