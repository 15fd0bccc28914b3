"""The engine's per-step deltas -> ChatResponse (whole) and ChatChunk choices (as they come).

A choice's text arrives final (stop strings and UTF-8 already handled by the engine). When tools are
offered (v3 template), the text may be a tool call, which only parses once complete: such a choice
streams its role at once and the rest (content or tool_calls) with its finish_reason.
"""

import secrets
import string
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from mistral_grpc.engine.request import ChoiceDelta, GenerationOutput, TokenLogprob
from mistral_grpc.proto.mistral.chat.v1 import chat_pb2
from mistral_grpc.tokenizer import ToolCall

# content, calls = parse(text): the tokenizer's parse_tool_calls.
ToolCallParser = Callable[[str], tuple[str, list[ToolCall]]]

_ID_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class CompletionHeader:
    """What every response (or chunk) of one completion repeats."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, model: str) -> "CompletionHeader":
        return cls(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model)


def usage(output: GenerationOutput) -> chat_pb2.Usage:
    return chat_pb2.Usage(prompt_tokens=output.prompt_tokens, completion_tokens=output.completion_tokens,
                          total_tokens=output.total_tokens)


def logprobs_message(entries: list[TokenLogprob]) -> chat_pb2.Logprobs:
    return chat_pb2.Logprobs(content=[
        chat_pb2.TokenLogprob(token=entry.token, logprob=entry.logprob, bytes=entry.bytes, top_logprobs=[
            chat_pb2.TopLogprob(token=top.token, logprob=top.logprob, bytes=top.bytes) for top in entry.top_logprobs])
        for entry in entries])


def tool_call_message(call: ToolCall, index: int | None = None) -> chat_pb2.ToolCall:
    """index is set in stream deltas only (OpenAI's shape)."""
    call_id = call.id or "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))
    message = chat_pb2.ToolCall(id=call_id, type="function",
                                function=chat_pb2.FunctionCall(name=call.name, arguments=call.arguments))
    if index is not None:
        message.index = index
    return message


class ChoiceState:
    """One choice (of n) of one completion, fed the engine's deltas in order."""

    def __init__(self, index: int, parse_tool_calls: ToolCallParser | None, want_logprobs: bool) -> None:
        self.index = index
        self._parse_tool_calls = parse_tool_calls  # None = tools not offered: all text is content
        self._want_logprobs = want_logprobs
        self._text: list[str] = []
        self._logprobs: list[TokenLogprob] = []
        self._streamed_logprobs = 0
        self._role_sent = False
        self._engine_finish_reason: str | None = None
        self._parsed: tuple[str, list[ToolCall]] | None = None

    @property
    def finished(self) -> bool:
        return self._engine_finish_reason is not None

    def add(self, delta: ChoiceDelta) -> chat_pb2.ChunkChoice | None:
        """Records the delta; returns what to stream for it now, or None when there is nothing new."""
        self._text.append(delta.text)
        self._logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self._engine_finish_reason = delta.finish_reason
        if self._parse_tool_calls is not None and not self.finished:
            return self._chunk_choice("", []) if not self._role_sent else None
        if self._parse_tool_calls is not None:
            content, calls = self._content_and_calls()
            return self._chunk_choice(content, calls)
        if not delta.text and not delta.logprobs and self._role_sent and not self.finished:
            return None  # e.g. a token held back as a possible stop string start
        return self._chunk_choice(delta.text, [])

    def choice(self) -> chat_pb2.Choice:
        """The whole choice, once finished (for Chat)."""
        content, calls = self._content_and_calls()
        choice = chat_pb2.Choice(index=self.index, finish_reason=self._finish_reason(calls),
                                 message=chat_pb2.AssistantMessage(role="assistant", content=content,
                                                                   tool_calls=[tool_call_message(c) for c in calls]))
        if self._want_logprobs:
            choice.logprobs.CopyFrom(logprobs_message(self._logprobs))
        return choice

    def _chunk_choice(self, content: str, calls: list[ToolCall]) -> chat_pb2.ChunkChoice:
        chunk = chat_pb2.ChunkChoice(index=self.index, delta=chat_pb2.Delta(
            role="" if self._role_sent else "assistant", content=content,
            tool_calls=[tool_call_message(call, i) for i, call in enumerate(calls)]))
        self._role_sent = True
        if self.finished:
            chunk.finish_reason = self._finish_reason(calls)
        new_logprobs = self._logprobs[self._streamed_logprobs:]
        if self._want_logprobs and new_logprobs:
            chunk.logprobs.CopyFrom(logprobs_message(new_logprobs))
            self._streamed_logprobs = len(self._logprobs)
        return chunk

    def _content_and_calls(self) -> tuple[str, list[ToolCall]]:
        text = "".join(self._text)
        if self._parse_tool_calls is None:
            return text, []
        if self._parsed is None:
            self._parsed = self._parse_tool_calls(text)
        return self._parsed

    def _finish_reason(self, calls: list[ToolCall]) -> str:
        return "tool_calls" if calls else (self._engine_finish_reason or "stop")
