"""The asyncio face of the engine: many concurrent callers, one worker thread stepping the model.

The gRPC handlers await `generate()`; they never wait on the model. Requests and aborts reach the
worker through a queue; outputs come back to each caller's asyncio queue through the event loop.
A caller that goes away (cancel, deadline, closed stream) aborts its request, and the worker frees
its blocks before the next step.
"""

import asyncio
import logging
import os
import queue
import tempfile
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from mistral_grpc.engine.args import EngineArgs
from mistral_grpc.engine.core import EngineCore
from mistral_grpc.engine.request import (EngineInternalError, EngineUnavailableError, GenerationOutput,
                                         GenerationRequest, QueueFullError, generation_budget)
from mistral_grpc.engine.sampling_params import SamplingParams, StructuredSpec
from mistral_grpc.engine.speculative import SpeculativeConfig
from mistral_grpc.metrics import (HELD_REQUESTS, KV_CACHE_BLOCKS_TOTAL, KV_CACHE_BLOCKS_USED, RUNNING_REQUESTS,
                                  WAITING_REQUESTS)
from mistral_grpc.model.decoder import MistralDecoder
from mistral_grpc.model.demo import write_demo_model
from mistral_grpc.tokenizer import ChatMessage, MistralTokenizer

log = logging.getLogger(__name__)

_DEFAULT_CPU_KV_BYTES = 2 * 2**30  # unless half the memory available at startup is less
_CUDA_KV_SHARE = 0.85  # of the GPU memory left free once the weights are loaded


# Outputs a caller may leave untaken before its request sits out the steps (see _Backlog).
MAX_BACKLOG = 32


class _Backlog:
    """Outputs emitted to one caller and not yet taken. A stream whose client stops reading stops
    taking them (gRPC flow control holds the handler's writes); past MAX_BACKLOG its sequences sit out
    the steps, keeping their blocks, until it catches up or goes away (cancel, deadline, keepalive), so
    a stalled reader costs neither compute nor an ever-growing buffer. Each count has one writer: the
    worker thread emits, the event loop takes."""

    def __init__(self, wakeup: threading.Event) -> None:
        self.emitted = 0
        self.taken = 0
        self._wakeup = wakeup

    @property
    def full(self) -> bool:
        return self.emitted - self.taken >= MAX_BACKLOG

    def take(self) -> None:
        self.taken += 1
        if self.emitted - self.taken == MAX_BACKLOG - 1:
            self._wakeup.set()  # the worker may be idle, every request it has being held


@dataclass(frozen=True)
class _Add:
    request: GenerationRequest
    max_tokens: int
    emit: object
    held: object


@dataclass(frozen=True)
class _Abort:
    request_id: str


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.model_name = args.served_model_name or ("demo" if args.model == "demo"
                                                     else os.path.basename(os.path.normpath(args.model)))
        self.ready = False
        self.max_model_len = 0
        self.tokenizer: MistralTokenizer | None = None
        self._core: EngineCore | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        # What the worker emitted during a step, per caller queue, handed to the event loop in one go.
        self._outbox: list[tuple[asyncio.Queue, GenerationOutput | Exception]] = []
        self._wakeup = threading.Event()
        self._worker: threading.Thread | None = None
        self._stopping = False
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the worker thread, which loads the model off the event loop; then warms it up."""
        loop = asyncio.get_running_loop()
        loaded: asyncio.Future[None] = loop.create_future()
        self._worker = threading.Thread(target=self._run, args=(loop, loaded), name="mistral-grpc-engine",
                                        daemon=True)
        self._worker.start()
        await loaded
        await self._warm_up()
        self.ready = True
        self._idle.set()

    def _load(self) -> None:
        device = self.args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = None if self.args.dtype == "auto" else getattr(torch, self.args.dtype)
        model_dir = self.args.model
        if model_dir == "demo":
            log.warning("serving the DEMO model: random weights, the real Mistral tokenizer. "
                        "Its text is meaningless; pass --model DIR for real weights.")
            model_dir = write_demo_model(os.path.join(tempfile.gettempdir(), "mistral-grpc-demo"))
        model = MistralDecoder.from_dir(model_dir, device=device, dtype=dtype, quantization=self.args.quantization)
        self.tokenizer = MistralTokenizer.from_dir(model_dir)
        if self.tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"{model_dir}: the tokenizer has {self.tokenizer.vocab_size} tokens but the model's "
                             f"vocab_size is {model.config.vocab_size}; tokenizer.json belongs to another model")
        num_blocks = self._num_kv_blocks(model)
        self.max_model_len = min(model.config.max_position_embeddings, num_blocks * self.args.block_size)
        self._core = EngineCore(model, self.tokenizer, num_blocks, self.args.block_size, self.args.max_batch_size,
                                self.args.max_prefill_tokens, self._speculative_config(model))
        KV_CACHE_BLOCKS_TOTAL.set(num_blocks)
        log.info("loaded %s on %s (%s, quantization %s, weights %.2f GiB): %d KV blocks of %d tokens, context %d",
                 model_dir, device, model.dtype, model.quantization_description, model.weight_bytes / 2**30, num_blocks,
                 self.args.block_size, self.max_model_len)

    def _speculative_config(self, model: MistralDecoder) -> SpeculativeConfig:
        """Speculation runs only where the decoder's kernels give a row the same result whatever the
        batch's size (the extension's packed CPU kernels): elsewhere (cuBLAS on CUDA, torch for float16
        on CPU) a decode row would round differently beside drafts, and drafts must change no result.
        A step verifies at most max_rows rows, its decodes included: a batch-1 decode reads every weight
        for one row, and more rows cost little until the step turns compute-bound, soonest for float32
        on a CPU (twice the bytes per multiply-add, and no bf16 matrix units)."""
        k = self.args.speculative_tokens
        rows_independent = all(layer.packed for layer in model.layers) and model.lm_head.packed is not None
        if k > 0 and not rows_independent:
            log.info("speculative decoding is off: on %s in %s the kernels round a row differently with the "
                     "batch's size, and drafts must change no result", model.device.type, model.dtype)
            k = 0
        compute_bound_sooner = model.dtype == torch.float32
        return SpeculativeConfig(max_drafts=k, prompt_lookup=self.args.prompt_lookup,
                                 max_rows=(1 + k) if compute_bound_sooner else 2 * (1 + k))

    def _num_kv_blocks(self, model: MistralDecoder) -> int:
        cfg = model.config
        bytes_per_block = (2 * cfg.num_hidden_layers * self.args.block_size * cfg.num_key_value_heads
                           * cfg.head_dim * model.dtype.itemsize)
        budget = self.args.kv_cache_memory
        if budget is None:
            if model.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(model.device)
                budget = int(free * _CUDA_KV_SHARE)
            else:
                budget = default_cpu_kv_bytes()
        blocks = budget // bytes_per_block
        if blocks < 1:
            raise ValueError(f"--kv-cache-memory {budget} bytes holds no KV block ({bytes_per_block} bytes each)")
        return int(blocks)

    async def _warm_up(self) -> None:
        """One short greedy generation, so the first real request pays no first-call costs."""
        prompt = self.tokenizer.encode_chat([ChatMessage(role="user", content="warm up")])
        request = GenerationRequest("warmup", prompt, SamplingParams(temperature=0.0, max_tokens=2), metered=False)
        async for _ in self._submit(request, self.resolve_max_tokens(request.params, len(prompt))):
            pass

    async def drain(self) -> None:
        """Refuses new requests and waits for the running ones to finish."""
        self._draining = True
        await self._idle.wait()

    async def shutdown(self) -> None:
        self._draining = True
        self._stopping = True
        self._wakeup.set()
        if self._worker is not None:
            await asyncio.to_thread(self._worker.join)
        self.ready = False

    def kv_blocks_used(self) -> int:
        return self._core.blocks.num_used_blocks if self._core else 0

    # ---- requests --------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Checks admission now (raising before anything streams), then yields outputs as they come."""
        if not self.ready or self._draining:
            raise EngineUnavailableError("the server is draining" if self._draining else "the model is loading")
        if self._in_flight >= self.args.max_batch_size + self.args.max_queue:
            raise QueueFullError(f"the queue is full ({self._in_flight} requests in flight); retry later")
        return self._submit(request, self.resolve_max_tokens(request.params, len(request.prompt_token_ids)))

    def compile_grammar(self, spec: StructuredSpec) -> None:
        """Compiles a structured-output constraint into the engine's cache, where the request then finds
        it; slow for a big schema, so the server calls it off the event loop. Raises InvalidSchemaError."""
        self._core.grammars.compile(spec)

    def resolve_max_tokens(self, params: SamplingParams, prompt_len: int) -> int:
        """The generated-token budget, or PromptTooLongError when prompt + max_tokens exceed the context."""
        return generation_budget(params.max_tokens, prompt_len, self.max_model_len)

    async def _submit(self, request: GenerationRequest, max_tokens: int) -> AsyncIterator[GenerationOutput]:
        outputs: asyncio.Queue[GenerationOutput | Exception] = asyncio.Queue()
        backlog = _Backlog(self._wakeup)
        finished = False
        self._in_flight += 1
        self._idle.clear()

        def emit(out: GenerationOutput | Exception) -> None:  # on the worker thread
            backlog.emitted += 1
            self._outbox.append((outputs, out))

        try:
            self._send(_Add(request, max_tokens, emit, lambda: backlog.full))
            while not finished:
                out = await outputs.get()
                backlog.take()
                if isinstance(out, Exception):
                    finished = True  # the worker already dropped the request
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self._send(_Abort(request.request_id))
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    def _send(self, message: _Add | _Abort) -> None:
        self._inbox.put(message)
        self._wakeup.set()

    # ---- worker thread ---------------------------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop, loaded: asyncio.Future) -> None:
        # Every torch op of the engine, loading included, runs on this one thread. torch's intra-op
        # threads are libgomp's, which keeps a pool of workers per thread that starts parallel work;
        # once the process has more of them than cores, idle workers sleep instead of spinning and
        # each parallel region pays a wake-up, a large share of a batch-1 decode step.
        try:
            self._load()
        except Exception as error:
            loop.call_soon_threadsafe(_settle, loaded, error)
            return
        loop.call_soon_threadsafe(_settle, loaded, None)
        core = self._core
        while not self._stopping:
            self._drain_inbox(core)
            self._deliver(loop)
            if not core.has_work:
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                stepped = core.step()
            except Exception:  # a failed step must not kill the server: fail its requests, keep serving
                log.exception("engine step failed; failing the requests in flight")
                core.fail_all(EngineInternalError("the engine failed while generating; see the server log"))
                stepped = True
            self._deliver(loop)
            self._update_gauges(core)
            if not stepped:  # all held by callers that stopped reading: wait for one of them, or news
                self._wakeup.wait()
                self._wakeup.clear()
        self._update_gauges(core)

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hands the step's outputs to their callers with one wake-up of the event loop, not one per
        request: the loop thread shares the cores with the model's threads."""
        if self._outbox:
            batch, self._outbox = self._outbox, []
            loop.call_soon_threadsafe(_put_all, batch)

    def _drain_inbox(self, core: EngineCore) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(message, _Add):
                core.add_request(message.request, message.max_tokens, message.emit, message.held)
            else:
                core.abort_request(message.request_id)
            self._update_gauges(core)

    def _update_gauges(self, core: EngineCore) -> None:
        held = core.held_requests()
        running = core.num_running_requests(held)
        RUNNING_REQUESTS.set(running)
        HELD_REQUESTS.set(len(held))
        WAITING_REQUESTS.set(core.num_requests - running - len(held))
        KV_CACHE_BLOCKS_USED.set(core.blocks.num_used_blocks)


def default_cpu_kv_bytes(meminfo: str = "/proc/meminfo") -> int:
    """The CPU KV cache when --kv-cache-memory is not given. It is resident from startup (faulted in
    at allocation), so on a small machine it takes at most half of what the system has available."""
    try:
        with open(meminfo) as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, IndexError, ValueError):  # not Linux, or an unreadable meminfo
        return _DEFAULT_CPU_KV_BYTES
    return min(_DEFAULT_CPU_KV_BYTES, available // 2)


def _put_all(batch: list[tuple[asyncio.Queue, GenerationOutput | Exception]]) -> None:
    for outputs, out in batch:
        outputs.put_nowait(out)


def _settle(future: asyncio.Future, error: Exception | None) -> None:
    if future.done():  # start() was cancelled meanwhile
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
