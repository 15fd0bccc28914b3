"""A scripted engine with LLMEngine's interface: each step yields the next piece of a fixed text per
choice, and KV blocks are counted the way the real engine holds them (freed on finish or abort)."""

import asyncio
import math
import threading
from collections.abc import AsyncIterator

from mistral_grpc.engine.request import (ChoiceDelta, EngineUnavailableError, GenerationOutput, GenerationRequest,
                                         PromptTooLongError, QueueFullError, TokenLogprob, TopLogprob)

from fake_tokenizer import MistralTokenizer

PIECES = ("Hel", "lo", "!", "", " I", " am", " choice", " {index}", ".")


def choice_text(index: int, pieces: tuple[str, ...] = PIECES) -> str:
    return "".join(pieces).replace("{index}", str(index))


class FakeEngine:
    def __init__(self, *, model_name: str = "demo", max_model_len: int = 256, step_delay: float = 0.0,
                 pieces: tuple[str, ...] = PIECES, max_queue: int = 1000, fail_after_steps: int | None = None,
                 load_gate: threading.Event | None = None, block_size: int = 16) -> None:
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tokenizer = MistralTokenizer()
        self.ready = False
        self.step_delay = step_delay
        self.pieces = pieces
        self.max_queue = max_queue
        self.fail_after_steps = fail_after_steps
        self.load_gate = load_gate  # start() waits for it: a model that loads when the test says
        self.block_size = block_size
        self.requests: list[GenerationRequest] = []
        self._draining = False
        self._blocks: dict[tuple[str, int], int] = {}  # (request, choice) -> blocks held
        self._running = 0

    async def start(self) -> None:
        if self.load_gate is not None:
            await asyncio.to_thread(self.load_gate.wait)
        self.ready = True

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if self._draining or not self.ready:
            raise EngineUnavailableError("draining" if self._draining else "loading")
        if self._running >= self.max_queue:
            raise QueueFullError(f"{self._running} requests waiting (--max-queue {self.max_queue})")
        prompt = len(request.prompt_token_ids)
        max_tokens = request.params.max_tokens
        if prompt + (max_tokens or 1) > self.max_model_len:
            raise PromptTooLongError(f"prompt {prompt} + max_tokens {max_tokens} > context {self.max_model_len}")
        self.requests.append(request)
        return self._run(request)

    async def _run(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        params = request.params
        prompt = len(request.prompt_token_ids)
        limit = min(len(self.pieces), params.max_tokens or self.max_model_len - prompt)
        self._running += 1
        generated = 0
        try:
            for step in range(limit):
                await asyncio.sleep(self.step_delay)
                if self.fail_after_steps is not None and step >= self.fail_after_steps:
                    raise RuntimeError("fake engine failure: secret internals /srv/model.py line 42")
                deltas = []
                for index in range(params.n):
                    self._blocks[(request.request_id, index)] = math.ceil((prompt + step + 1) / self.block_size)
                    text = self.pieces[step].replace("{index}", str(index))
                    finish = None
                    if step == limit - 1:
                        finish = "stop" if limit == len(self.pieces) else "length"
                    logprobs = [self._logprob(text, params.top_logprobs)] if params.logprobs else []
                    deltas.append(ChoiceDelta(index=index, text=text, token_ids=[100 + step], logprobs=logprobs,
                                              finish_reason=finish))
                    generated += 1
                yield GenerationOutput(deltas=deltas, prompt_tokens=prompt, completion_tokens=generated)
        finally:
            self._running -= 1
            for index in range(params.n):
                self._blocks.pop((request.request_id, index), None)

    @staticmethod
    def _logprob(text: str, top: int) -> TokenLogprob:
        data = list(text.encode())
        return TokenLogprob(token=text, logprob=-0.25, bytes=data,
                            top_logprobs=[TopLogprob(token=text, logprob=-0.25 - i, bytes=data) for i in range(top)])

    async def drain(self) -> None:
        self._draining = True
        while self._running:
            await asyncio.sleep(0.01)

    async def shutdown(self) -> None:
        self.ready = False

    def kv_blocks_used(self) -> int:
        return sum(self._blocks.values())
