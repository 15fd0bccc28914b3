"""ChatService on the engine: Chat (whole completion) and StreamChat (chunks as tokens are made).

Each call: check the server is serving -> validate -> template + tokenize (off the event loop) ->
check the context -> engine.generate -> responses. Every way a call ends is counted in
mistral_grpc_requests_total{rpc,code}. A call that is cancelled or runs past its deadline closes the
engine's iterator, which aborts the request and frees its KV blocks.
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
from mistral_grpc.engine.request import GenerationOutput, GenerationRequest, PromptTooLongError
from mistral_grpc.engine.sampling_params import StructuredSpec
from mistral_grpc.proto.mistral.chat.v1 import chat_pb2, chat_pb2_grpc
from mistral_grpc.server import errors
from mistral_grpc.server.responses import ChoiceState, CompletionHeader, usage
from mistral_grpc.server.validation import compile_grammar, decode_request, parse_request
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
        self._running_calls = 0
        self._no_calls = asyncio.Event()
        self._no_calls.set()

    def start_draining(self) -> None:
        """From now on new calls get UNAVAILABLE; calls already running go on."""
        self._draining = True

    async def wait_for_running_calls(self) -> None:
        """Returns once no Chat or StreamChat call is running."""
        await self._no_calls.wait()

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
                        yield chunk
            except BaseException as error:  # noqa: BLE001
                await self._fail("StreamChat", error, call, context)
                raise
        _count("StreamChat", grpc.StatusCode.OK, call.started)

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        self._running_calls += 1
        self._no_calls.clear()
        try:
            yield
        finally:
            self._running_calls -= 1
            if not self._running_calls:
                self._no_calls.set()

    async def _chat(self, request: chat_pb2.ChatRequest) -> chat_pb2.ChatResponse:
        header = CompletionHeader.new(self._engine.model_name)
        generation, choices = await self._prepare(request, header.id)
        last: GenerationOutput | None = None
        async with contextlib.aclosing(self._engine.generate(generation)) as outputs:
            async for output in outputs:
                for delta in output.deltas:
                    choices[delta.index].add(delta)
                last = output
        if last is None:
            raise RuntimeError("the engine ended a request without any output")
        return chat_pb2.ChatResponse(id=header.id, object="chat.completion", created=header.created,
                                     model=header.model, choices=[choice.choice() for choice in choices],
                                     usage=usage(last))

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
        choices = [ChoiceState(i, parsed.params.logprobs) for i in range(parsed.params.n)]
        return GenerationRequest(request_id=request_id, prompt_token_ids=prompt, params=parsed.params), choices

    async def _fail(self, rpc: str, error: BaseException, call: "_Call", context: grpc.aio.ServicerContext) -> None:
        """Counts the call's ending; for a failure it can describe, aborts with that status (raises)."""
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

