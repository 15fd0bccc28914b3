"""Tokenizer speed: chat template + encode of a long conversation, decode, streaming detokenize.

    PYTHONPATH=python python benchmarks/bench_tokenizer.py [--tokens 4000] [--repeat 50]

Prints one row per case (median and best of --repeat runs). The target from the issue: template +
encode of a 4,000-token conversation under 5 ms. mistral-common (SentencePiece + pydantic) is timed
on the same conversation as a yardstick.
"""

from __future__ import annotations

import argparse
import random
import statistics
import string
import sys
import time
from pathlib import Path
from typing import Callable

from mistral_grpc.tokenizer import ChatMessage, MistralTokenizer, ToolCall, ToolDefinition

ROOT = Path(__file__).parents[1]
DATA = ROOT / "python/mistral_grpc/data"
sys.path.append(str(ROOT / "tests/tokenizer"))  # tokenizer_cases: the conversion to mistral-common's types
PARAGRAPH = (
    "The gRPC service streams tokens as soon as they are valid UTF-8; café, naïve, 東京, 😀 included. "
    "Continuous batching keeps the GPU busy while KV-cache blocks are shared between requests. "
)
TOOL = ToolDefinition(
    "get_weather",
    "Current weather for a city",
    {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]},
)


def conversation(tokenizer: MistralTokenizer, target_tokens: int, with_tools: bool) -> list[ChatMessage]:
    messages = [ChatMessage("system", "You are a helpful assistant.")]
    turn = 0
    while len(tokenizer.encode_chat(messages + [ChatMessage("user", "?")])) < target_tokens:
        turn += 1
        messages.append(ChatMessage("user", f"Question {turn}: " + PARAGRAPH * 2))
        if with_tools and turn % 3 == 0:
            call_id = f"call{turn:05d}"
            call = ToolCall(call_id, "get_weather", '{"city": "Paris", "unit": "c"}')
            result = ChatMessage("tool", '{"temp": 21}', tool_call_id=call_id)
            messages += [ChatMessage("assistant", tool_calls=[call]), result]
        messages.append(ChatMessage("assistant", f"Answer {turn}. " + PARAGRAPH * 3))
    return messages + [ChatMessage("user", "Summarize our conversation.")]


def timed(run: Callable[[], object], repeat: int) -> tuple[float, float]:
    run()  # warm the BPE word cache, as a running server's is
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, min(times) * 1e3


def timed_unseen_words(tokenizer: MistralTokenizer, repeat: int) -> tuple[str, float, float]:
    """encode_chat of conversations made of random letter strings: BPE word-cache misses throughout.

    The worst case (about three tokens per word, none seen before); the other rows reuse words.
    21 messages of 60 words come to about 4,000 tokens.
    """
    rng = random.Random(0)
    times = []
    for _ in range(repeat):
        messages = [
            ChatMessage(("user", "assistant")[i % 2], " ".join(
                "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(60)))
            for i in range(21)
        ]
        start = time.perf_counter()
        ids = tokenizer.encode_chat(messages)
        times.append(time.perf_counter() - start)
    return f"{len(messages)} messages of unseen words, {len(ids)} tokens", statistics.median(times) * 1e3, min(times) * 1e3


def reference_encoder(version: str, messages: list[ChatMessage], tools: list[ToolDefinition] | None):
    """mistral-common's encode_chat_completion for the same conversation, or None if not installed."""
    try:
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as McTokenizer
        from tokenizer_cases import reference_request
    except ImportError:
        return None
    request = reference_request(messages, tools)
    reference = McTokenizer.v3() if version == "v3" else McTokenizer.v1()
    return lambda: reference.encode_chat_completion(request).tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    rows = []
    for version in ("v1", "v3"):
        tokenizer = MistralTokenizer.from_file(DATA / f"mistral_tokenizer_{version}.json")
        for with_tools in (False, True) if version == "v3" else (False,):
            tools = [TOOL] if with_tools else None
            messages = conversation(tokenizer, args.tokens, with_tools)
            ids = tokenizer.encode_chat(messages, tools)
            label = f"{version}{' + tools' if with_tools else ''}, {len(messages)} messages, {len(ids)} tokens"
            rows.append((f"encode_chat  {label}", *timed(lambda: tokenizer.encode_chat(messages, tools), args.repeat)))
            reference = reference_encoder(version, messages, tools)
            if reference is not None:
                assert reference() == ids, "the benchmark conversation encodes differently from mistral-common"
                rows.append((f"mistral-common  {label}", *timed(reference, max(args.repeat // 5, 3))))
        label, median, best = timed_unseen_words(tokenizer, max(args.repeat // 5, 3))
        rows.append((f"encode_chat  {version}, {label}", median, best))
        rows.append((f"decode  {version}, {len(ids)} tokens", *timed(lambda: tokenizer.decode(ids), args.repeat)))

        def stream() -> None:
            detokenizer = tokenizer.detokenizer()
            for token_id in ids:
                detokenizer.push(token_id)
            detokenizer.flush()

        rows.append((f"stream  {version}, {len(ids)} tokens one by one", *timed(stream, args.repeat)))
    width = max(len(name) for name, *_ in rows)
    print(f"{'case':<{width}}  {'median ms':>10}  {'best ms':>8}")
    for name, median, best in rows:
        print(f"{name:<{width}}  {median:>10.3f}  {best:>8.3f}")


if __name__ == "__main__":
    main()
