"""ChatService on the engine: Chat (whole completion) and StreamChat (chunks as tokens are made).

Each call: check the server is serving -> validate -> template + tokenize (off the event loop) ->
check the context (and, for Chat, that the whole response can fit one message) -> engine.generate ->
responses. Every way a call ends is counted in
mistral_grpc_requests_total{rpc,code}. A call that is cancelled or runs past its deadline closes the
engine's iterator, which aborts the request and frees its KV blocks. A stopping server ends the calls
still running with a status of its own (end_running_calls): UNAVAILABLE saying why, not grpc's
generic "Cancelling all calls".
"""

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Protocol

import grpc

from mistral_grpc import metrics
from mistral_grpc.engine.request import GenerationOutput, GenerationRequest, PromptTooLongError, generation_budget
from mistral_grpc.engine.sampling_params import StructuredSpec
from mistral_grpc.proto.mistral.chat.v1 import chat_pb2, chat_pb2_grpc
from mistral_grpc.server import errors
from mistral_grpc.server.responses import (MAX_RESPONSE_BYTES, ChoiceState, CompletionHeader, response_token_limit,
                                           usage)
from mistral_grpc.server.validation import compile_grammar, decode_request, parse_request, prediction_tokens
from mistral_grpc.tokenizer import MistralTokenizer

logger = logging.getLogger(__name__)

# A client's deadline reaches the server as grpc-timeout, rounded up (to 10 ms under 10 s, 100 ms under
# 100 s, 1 s above: at most 1%) and counted from arrival, so the client's own expiry and its cancel arrive
# a little before the server's copy runs out. A cancel this close to the deadline is the deadline.
_DEADLINE_SLACK_S = 0.05
_DEADLINE_SLACK_SHARE = 0.01


class Engine(Protocol):
    """The part of LLMEngine the servicer uses."""

    model_name: str
    max_model_len: int
    tokenizer: MistralTokenizer
    ready: bool

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationOutput, None]:
        """Closing the generator (or cancelling its consumer) aborts the request and frees its KV blocks."""

    def compile_grammar(self, spec: StructuredSpec) -> None:
        """Compiles a structured-output constraint into the engine's cache (raises InvalidSchemaError)."""


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._draining = False
        self._running_calls: set[asyncio.Task] = set()
        self._no_calls = asyncio.Event()
        self._no_calls.set()
        self._ended_by: errors.RequestError | None = None  # the status end_running_calls gave them
        self._sending: set[asyncio.Task] = set()  # StreamChat calls whose chunk grpc is sending

    def start_draining(self) -> None:
        """From now on new calls get UNAVAILABLE; calls already running go on."""
        self._draining = True

    async def wait_for_running_calls(self) -> None:
        """Returns once no Chat or StreamChat call is running."""
        await self._no_calls.wait()

    def end_running_calls(self, status: errors.RequestError) -> None:
        """Cancels the running calls (their generation stops, their KV blocks are freed); each ends with
        `status`. The server then needs a moment (its stop grace) for the statuses to go out."""
        self._ended_by = status
        for task in self._running_calls - self._sending:
            task.cancel()

    async def Chat(self, request: bytes | chat_pb2.ChatRequest,
                   context: grpc.aio.ServicerContext) -> chat_pb2.ChatResponse:
        """request: the call's raw bytes (as registered by add_to_server), or a ChatRequest."""
        call = _Call(time.monotonic(), context.time_remaining())
        with self._running():
            try:
                response = await self._chat(decode_request(request))
            except BaseException as error:  # noqa: BLE001 (every ending is classified and counted)
                await self._fail("Chat", error, call, context)
                raise
        _count("Chat", grpc.StatusCode.OK, call.started)
        return response

    async def StreamChat(self, request: bytes | chat_pb2.ChatRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[chat_pb2.ChatChunk]:
        call = _Call(time.monotonic(), context.time_remaining())
        with self._running():
            try:
                async with contextlib.aclosing(self._stream(decode_request(request))) as chunks:
                    async for chunk in chunks:
                        # While grpc sends the chunk the call's task runs grpc's code, not ours: a cancel
                        # landing there would end the call with grpc's own status, so end_running_calls
                        # leaves a sending call alone and it ends itself here, once the chunk is out.
                        self._sending.add(task := asyncio.current_task())
                        try:
                            yield chunk
                        finally:
                            self._sending.discard(task)
                        if self._ended_by is not None:
                            raise asyncio.CancelledError
            except BaseException as error:  # noqa: BLE001
                await self._fail("StreamChat", error, call, context)
                raise
        _count("StreamChat", grpc.StatusCode.OK, call.started)

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        task = asyncio.current_task()  # grpc.aio runs each call in a task of its own
        self._running_calls.add(task)
        self._no_calls.clear()
        try:
            yield
        finally:
            self._running_calls.discard(task)
            if not self._running_calls:
                self._no_calls.set()

    async def _chat(self, request: chat_pb2.ChatRequest) -> chat_pb2.ChatResponse:
        header = CompletionHeader.new(self._engine.model_name)
        generation, choices = await self._prepare(request, header.id)
        self._check_response_fits(request, generation)
        last: GenerationOutput | None = None
        async with contextlib.aclosing(self._engine.generate(generation)) as outputs:
            async for output in outputs:
                for delta in output.deltas:
                    choices[delta.index].add(delta)
                last = output
        if last is None:
            raise RuntimeError("the engine ended a request without any output")
        response = chat_pb2.ChatResponse(id=header.id, object="chat.completion", created=header.created,
                                         model=header.model, choices=[choice.choice() for choice in choices],
                                         usage=usage(last))
        if (size := response.ByteSize()) > MAX_RESPONSE_BYTES:  # the check before generating should make it fit
            logger.warning("Chat %s: the response is %d bytes, over the %d a message may have", header.id, size,
                           MAX_RESPONSE_BYTES)
            raise _response_too_large(request, f"the response came to {size / (1 << 20):.0f} MiB")
        return response

    def _check_response_fits(self, request: chat_pb2.ChatRequest, generation: GenerationRequest) -> None:
        """Refuses, before generating, a Chat whose whole response could outgrow the largest message
        the server sends (n choices of max_tokens tokens, each with top_logprobs alternatives)."""
        params = generation.params
        tokens = generation_budget(params.max_tokens, len(generation.prompt_token_ids), self._engine.max_model_len)
        limit = response_token_limit(self._engine.tokenizer, params)
        if tokens > limit:
            length = (f"max_tokens {tokens}" if params.max_tokens is not None
                      else f"the {tokens} tokens the context leaves")
            logprobs = f", with logprobs and top_logprobs {params.top_logprobs}," if params.logprobs else ""
            raise _response_too_large(request, f"{params.n} choice(s) of up to {length}{logprobs} could outgrow it "
                                               f"(at most {limit} tokens per choice fit)")

    async def _stream(self, request: chat_pb2.ChatRequest) -> AsyncIterator[chat_pb2.ChatChunk]:
        header = CompletionHeader.new(self._engine.model_name)
        generation, choices = await self._prepare(request, header.id)
        async with contextlib.aclosing(self._engine.generate(generation)) as outputs:
            async for output in outputs:
                updates = [update for delta in output.deltas
                           if (update := choices[delta.index].add(delta)) is not None]
                if updates or output.finished:
                    chunk = chat_pb2.ChatChunk(id=header.id, object="chat.completion.chunk",
                                               created=header.created, model=header.model, choices=updates)
                    if output.finished:
                        chunk.usage.CopyFrom(usage(output))
                    yield chunk
                if output.finished:
                    return
        raise RuntimeError("the engine ended a request before all its choices finished")

    async def _prepare(self, request: chat_pb2.ChatRequest,
                       request_id: str) -> tuple[GenerationRequest, list[ChoiceState]]:
        if self._draining:
            raise errors.UNAVAILABLE_DRAINING
        if not self._engine.ready:
            raise errors.UNAVAILABLE_LOADING
        tokenizer = self._engine.tokenizer
        parsed = parse_request(request, self._engine.model_name, tokenizer.tool_calls_token_id is not None)
        # Text of c characters is at least c / max_token_chars tokens: a conversation too long by that
        # count alone is refused before seconds of CPU go into encoding it.
        chars = sum(len(m.content) for m in parsed.messages)
        if chars > self._engine.max_model_len * tokenizer.max_token_chars:
            raise PromptTooLongError(f"the messages hold {chars} characters, more than a context of "
                                     f"{self._engine.max_model_len} tokens can take; shorten the conversation",
                                     "messages")
        # A 32K-token prompt takes a while to template and encode, a big schema to compile: keep the
        # event loop free for other calls.
        prompt = await asyncio.to_thread(tokenizer.encode_chat, parsed.messages, parsed.tools)
        if parsed.params.structured is not None:
            await asyncio.to_thread(compile_grammar, self._engine.compile_grammar, parsed.params.structured)
        prediction = None
        if parsed.prediction is not None:
            prediction = await asyncio.to_thread(prediction_tokens, tokenizer, parsed.prediction,
                                                 self._engine.max_model_len)
        choices = [ChoiceState(i, parsed.params.logprobs, parsed.max_tool_calls) for i in range(parsed.params.n)]
        return GenerationRequest(request_id=request_id, prompt_token_ids=prompt, params=parsed.params,
                                 prediction=prediction), choices

    async def _fail(self, rpc: str, error: BaseException, call: "_Call", context: grpc.aio.ServicerContext) -> None:
        """Counts the call's ending; for a failure it can describe, aborts with that status (raises)."""
        if isinstance(error, asyncio.CancelledError) and self._ended_by is not None:
            error = self._ended_by  # end_running_calls cancelled it
        if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            code = grpc.StatusCode.DEADLINE_EXCEEDED if call.expired(context) else grpc.StatusCode.CANCELLED
            _count(rpc, code, call.started)
            return
        if isinstance(error, grpc.aio.AbortError) or not isinstance(error, Exception):
            return
        failure = errors.describe(error)
        if failure is None:
            incident = uuid.uuid4().hex[:12]
            logger.error("%s failed (incident %s)", rpc, incident, exc_info=error)
            failure = errors.internal(incident)
        _count(rpc, failure.code, call.started)
        status = failure.to_status()
        await context.abort(status.code, status.details, status.trailing_metadata)


class _Call:
    """What the servicer knows about one call for counting how it ended."""

    def __init__(self, started: float, deadline_budget: float | None) -> None:
        self.started = started
        self.deadline_budget = deadline_budget  # seconds left on arrival; None = no deadline

    def expired(self, context: grpc.aio.ServicerContext) -> bool:
        """Whether a cancel is the deadline running out (allowing for grpc-timeout's rounding)."""
        remaining = context.time_remaining()
        if remaining is None or self.deadline_budget is None:
            return remaining is not None and remaining <= 0
        return remaining <= _DEADLINE_SLACK_S + _DEADLINE_SLACK_SHARE * self.deadline_budget


def _response_too_large(request: chat_pb2.ChatRequest, why: str) -> errors.RequestError:
    """INVALID_ARGUMENT on the fields that size a Chat response (not RESOURCE_EXHAUSTED: retrying does
    not help)."""
    limit = f"{MAX_RESPONSE_BYTES >> 20} MiB"
    description = (f"a Chat response is one message of at most {limit}: {why}. Lower max_tokens, n or "
                   "top_logprobs, or call StreamChat, which sends the completion in chunks")
    length = "max_completion_tokens" if request.HasField("max_completion_tokens") else "max_tokens"
    fields = [length, "n"] + (["top_logprobs"] if request.top_logprobs else [])
    return errors.invalid_argument([(field, description) for field in fields])


def add_to_server(servicer: ChatServicer, server: grpc.aio.Server) -> None:
    """Registers ChatService with no request deserializer: the servicer decodes the bytes itself, so a
    request protobuf cannot decode (malformed, or nested past its depth limit) is INVALID_ARGUMENT with
    a reason, and counted, rather than grpc's UNKNOWN. Reflection serves the schema as before."""
    service = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
    handlers = {
        "Chat": grpc.unary_unary_rpc_method_handler(
            servicer.Chat, response_serializer=chat_pb2.ChatResponse.SerializeToString),
        "StreamChat": grpc.unary_stream_rpc_method_handler(
            servicer.StreamChat, response_serializer=chat_pb2.ChatChunk.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def _count(rpc: str, code: grpc.StatusCode, started: float) -> None:
    metrics.REQUESTS.labels(rpc=rpc, code=code.name).inc()
    metrics.REQUEST_DURATION.labels(rpc=rpc).observe(time.monotonic() - started)

