"""A scripted engine with LLMEngine's interface and the real tokenizer: each step yields the next
piece of a fixed text per choice, and KV blocks are counted the way the real engine holds them
(freed when the request finishes or its iterator is closed)."""

import asyncio
import math
import threading
from collections.abc import AsyncGenerator
from functools import cache

from mistral_grpc.engine.request import (ChoiceDelta, EngineUnavailableError, GenerationOutput, GenerationRequest,
                                         QueueFullError, TokenLogprob, TopLogprob, generation_budget)
from mistral_grpc.engine.sampling_params import StructuredSpec
from mistral_grpc.engine.structured import GrammarCompiler
from mistral_grpc.tokenizer import MistralTokenizer, ToolCall
from mistral_grpc.tokenizer.vocab import SHIPPED_DIR

PIECES = ("Hel", "lo", "!", "", " I", " am", " choice", " {index}", ".")


@cache
def tokenizer(version: str = "v3") -> MistralTokenizer:
    return MistralTokenizer.from_file(SHIPPED_DIR / f"mistral_tokenizer_{version}.json")


def choice_text(index: int, pieces: tuple[str, ...] = PIECES) -> str:
    return "".join(pieces).replace("{index}", str(index))


class FakeEngine:
    def __init__(self, *, model_name: str = "demo", max_model_len: int = 256, step_delay: float = 0.0,
                 pieces: tuple[str, ...] = PIECES, tool_calls: tuple[ToolCall, ...] = (), max_queue: int = 1000,
                 fail_after_steps: int | None = None, load_gate: threading.Event | None = None,
                 template: str = "v3", block_size: int = 16) -> None:
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer(template)
        self.grammars = GrammarCompiler(self.tokenizer)
        self.ready = False
        self.step_delay = step_delay
        self.pieces = pieces
        self.tool_calls = list(tool_calls)  # when given: the pieces are held back, the calls come at the end
        self.max_queue = max_queue
        self.fail_after_steps = fail_after_steps
        self.load_gate = load_gate  # start() waits for it: a model that loads when the test says
        self.block_size = block_size
        self.requests: list[GenerationRequest] = []
        self.running = 0
        self._draining = False
        self._blocks: dict[tuple[str, int], int] = {}  # (request, choice) -> blocks held

    async def start(self) -> None:
        if self.load_gate is not None:
            await asyncio.to_thread(self.load_gate.wait)
        self.ready = True

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationOutput, None]:
        if self._draining or not self.ready:
            raise EngineUnavailableError("draining" if self._draining else "loading")
        if self.running >= self.max_queue:
            raise QueueFullError(f"{self.running} requests in flight")
        budget = generation_budget(request.params.max_tokens, len(request.prompt_token_ids), self.max_model_len)
        self.requests.append(request)
        return self._run(request, budget)

    async def _run(self, request: GenerationRequest, budget: int) -> AsyncGenerator[GenerationOutput, None]:
        params = request.params
        prompt = len(request.prompt_token_ids)
        steps = min(len(self.pieces), budget)
        self.running += 1
        generated = 0
        try:
            for step in range(steps):
                await asyncio.sleep(self.step_delay)
                if self.fail_after_steps is not None and step >= self.fail_after_steps:
                    raise RuntimeError("fake engine failure: secret internals /srv/model.py line 42")
                last = step == steps - 1
                deltas = []
                for index in range(params.n):
                    self._blocks[(request.request_id, index)] = math.ceil((prompt + step + 1) / self.block_size)
                    text = self.pieces[step].replace("{index}", str(index))
                    delta = ChoiceDelta(index=index, text=text, token_ids=[100 + step],
                                        logprobs=[self._logprob(text, params.top_logprobs)] if params.logprobs else [])
                    if self.tool_calls:
                        delta.text = ""
                    if last:
                        delta.finish_reason = "stop" if steps == len(self.pieces) else "length"
                        if self.tool_calls:
                            delta.tool_calls, delta.finish_reason = self.tool_calls, "tool_calls"
                    deltas.append(delta)
                    generated += 1
                yield GenerationOutput(deltas=deltas, prompt_tokens=prompt, completion_tokens=generated, finished=last)
        finally:
            self.running -= 1
            for index in range(params.n):
                self._blocks.pop((request.request_id, index), None)

    @staticmethod
    def _logprob(text: str, top: int) -> TokenLogprob:
        data = list(text.encode())
        return TokenLogprob(token=text, logprob=-0.25, bytes=data,
                            top_logprobs=[TopLogprob(token=text, logprob=-0.25 - i, bytes=data) for i in range(top)])

    def compile_grammar(self, spec: StructuredSpec) -> None:
        self.grammars.compile(spec)

    async def drain(self) -> None:
        self._draining = True
        while self.running:
            await asyncio.sleep(0.01)

    async def shutdown(self) -> None:
        self.ready = False

    def kv_blocks_used(self) -> int:
        return sum(self._blocks.values())
