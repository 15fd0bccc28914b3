"""The engine's per-step deltas -> ChatResponse (whole) and ChatChunk choices (as they come).

A delta arrives final: its text is valid UTF-8 and never part of a stop string, and a v0.3 tool
call comes parsed, whole, on its choice's last delta (finish_reason "tool_calls").
"""

import time
import uuid
from dataclasses import dataclass

from mistral_grpc.engine.request import ChoiceDelta, GenerationOutput, TokenLogprob
from mistral_grpc.proto.mistral.chat.v1 import chat_pb2
from mistral_grpc.tokenizer import ToolCall


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
    """completion_tokens_details only where speculative decoding verified drafts for the request (unset
    it reads as zeros; JSON then shows the usage as before speculation existed)."""
    message = chat_pb2.Usage(prompt_tokens=output.prompt_tokens, completion_tokens=output.completion_tokens,
                             total_tokens=output.total_tokens)
    if output.accepted_prediction_tokens or output.rejected_prediction_tokens:
        message.completion_tokens_details.CopyFrom(chat_pb2.CompletionTokensDetails(
            accepted_prediction_tokens=output.accepted_prediction_tokens,
            rejected_prediction_tokens=output.rejected_prediction_tokens))
    return message


def logprobs_message(entries: list[TokenLogprob]) -> chat_pb2.Logprobs:
    return chat_pb2.Logprobs(content=[
        chat_pb2.TokenLogprob(token=entry.token, logprob=entry.logprob, bytes=entry.bytes, top_logprobs=[
            chat_pb2.TopLogprob(token=top.token, logprob=top.logprob, bytes=top.bytes) for top in entry.top_logprobs])
        for entry in entries])


def tool_call_message(call: ToolCall, index: int | None = None) -> chat_pb2.ToolCall:
    """index is set in stream deltas only (OpenAI's shape)."""
    message = chat_pb2.ToolCall(id=call.id, type="function",
                                function=chat_pb2.FunctionCall(name=call.name, arguments=call.arguments))
    if index is not None:
        message.index = index
    return message


class ChoiceState:
    """One choice (of n) of one completion, fed the engine's deltas in order."""

    def __init__(self, index: int, want_logprobs: bool) -> None:
        self.index = index
        self._want_logprobs = want_logprobs
        self._text: list[str] = []
        self._logprobs: list[TokenLogprob] = []
        self._tool_calls: list[ToolCall] = []
        self._finish_reason = ""
        self._role_sent = False

    def add(self, delta: ChoiceDelta) -> chat_pb2.ChunkChoice | None:
        """Records the delta; returns what to stream for it, or None when it brings nothing to send
        (a token held back as the possible start of a stop string, or of a UTF-8 character)."""
        first_call = len(self._tool_calls)
        self._text.append(delta.text)
        self._logprobs += delta.logprobs
        self._tool_calls += delta.tool_calls
        self._finish_reason = delta.finish_reason or self._finish_reason
        news = delta.text or delta.tool_calls or delta.finish_reason or (self._want_logprobs and delta.logprobs)
        if self._role_sent and not news:
            return None
        chunk = chat_pb2.ChunkChoice(index=self.index, finish_reason=delta.finish_reason or "", delta=chat_pb2.Delta(
            role="" if self._role_sent else "assistant", content=delta.text,
            tool_calls=[tool_call_message(call, first_call + i) for i, call in enumerate(delta.tool_calls)]))
        if self._want_logprobs and delta.logprobs:
            chunk.logprobs.CopyFrom(logprobs_message(delta.logprobs))
        self._role_sent = True
        return chunk

    def choice(self) -> chat_pb2.Choice:
        """The whole choice, once finished (for Chat)."""
        choice = chat_pb2.Choice(index=self.index, finish_reason=self._finish_reason, message=chat_pb2.AssistantMessage(
            role="assistant", content="".join(self._text),
            tool_calls=[tool_call_message(call) for call in self._tool_calls]))
        if self._want_logprobs:
            choice.logprobs.CopyFrom(logprobs_message(self._logprobs))
        return choice
