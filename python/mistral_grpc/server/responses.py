"""The engine's per-step deltas -> ChatResponse (whole) and ChatChunk choices (as they come).

A delta arrives final: its text is valid UTF-8 and never part of a stop string, and a v0.3 tool
call comes parsed, whole, on its choice's last delta (finish_reason "tool_calls").
"""

import time
import uuid
from dataclasses import dataclass
from functools import cache

from mistral_grpc.engine.request import ChoiceDelta, GenerationOutput, TokenLogprob
from mistral_grpc.engine.sampling_params import SamplingParams
from mistral_grpc.proto.mistral.chat.v1 import chat_pb2
from mistral_grpc.tokenizer import MistralTokenizer, ToolCall

# The largest message the server sends (grpc.max_send_message_length): a whole ChatResponse must fit.
MAX_RESPONSE_BYTES = 64 << 20
# What a response holds besides its tokens: id, model, usage, and each choice's index, role,
# finish_reason and tool-call ids (generous).
_RESPONSE_OVERHEAD_BYTES = 4096
_CHOICE_OVERHEAD_BYTES = 256
# A TokenLogprob or TopLogprob inside its parent: a field tag and up to two bytes of length.
_NESTING_BYTES = 3


@dataclass(frozen=True)
class CompletionHeader:
    """What every response (or chunk) of one completion repeats."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, model: str) -> "CompletionHeader":
        return cls(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model)


def response_token_limit(tokenizer: MistralTokenizer, params: SamplingParams) -> int:
    """The most tokens each of the n choices may generate for a ChatResponse to fit MAX_RESPONSE_BYTES
    whatever the tokens are (each taken as the vocabulary's largest, with its logprobs as asked)."""
    text, entry = _largest_token_bytes(tokenizer)
    per_token = text + ((entry + _NESTING_BYTES) * (1 + params.top_logprobs) if params.logprobs else 0)
    per_choice = (MAX_RESPONSE_BYTES - _RESPONSE_OVERHEAD_BYTES) // params.n - _CHOICE_OVERHEAD_BYTES
    return per_choice // per_token


@cache
def _largest_token_bytes(tokenizer: MistralTokenizer) -> tuple[int, int]:
    """The most bytes one token adds to a reply's text (a byte-fallback token decodes to U+FFFD, 3 bytes),
    and the largest encoded TopLogprob (the fields a TokenLogprob has besides its top_logprobs)."""
    text = entry = 0
    for token in range(tokenizer.vocab_size):
        raw = tokenizer.token_bytes(token)
        shown = raw.decode("utf-8", errors="replace")
        text = max(text, len(shown.encode()))
        entry = max(entry, chat_pb2.TopLogprob(token=shown, logprob=-1.0, bytes=list(raw)).ByteSize())
    return text, entry


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
    """One choice (of n) of one completion, fed the engine's deltas in order.

    max_tool_calls: parallel_tool_calls false gives 1: a model that wrote more calls (tool_choice
    "auto", which no grammar constrains) has its first one returned.
    """

    def __init__(self, index: int, want_logprobs: bool, max_tool_calls: int | None = None) -> None:
        self.index = index
        self._want_logprobs = want_logprobs
        self._max_tool_calls = max_tool_calls
        self._text: list[str] = []
        self._logprobs: list[TokenLogprob] = []
        self._tool_calls: list[ToolCall] = []
        self._finish_reason = ""
        self._role_sent = False

    def add(self, delta: ChoiceDelta) -> chat_pb2.ChunkChoice | None:
        """Records the delta; returns what to stream for it, or None when it brings nothing to send
        (a token held back as the possible start of a stop string, or of a UTF-8 character)."""
        first_call = len(self._tool_calls)
        tool_calls = delta.tool_calls[:self._calls_left()]
        self._text.append(delta.text)
        self._logprobs += delta.logprobs
        self._tool_calls += tool_calls
        self._finish_reason = delta.finish_reason or self._finish_reason
        news = delta.text or tool_calls or delta.finish_reason or (self._want_logprobs and delta.logprobs)
        if self._role_sent and not news:
            return None
        chunk = chat_pb2.ChunkChoice(index=self.index, finish_reason=delta.finish_reason or "", delta=chat_pb2.Delta(
            role="" if self._role_sent else "assistant", content=delta.text,
            tool_calls=[tool_call_message(call, first_call + i) for i, call in enumerate(tool_calls)]))
        if self._want_logprobs and delta.logprobs:
            chunk.logprobs.CopyFrom(logprobs_message(delta.logprobs))
        self._role_sent = True
        return chunk

    def _calls_left(self) -> int | None:
        return None if self._max_tool_calls is None else self._max_tool_calls - len(self._tool_calls)

    def choice(self) -> chat_pb2.Choice:
        """The whole choice, once finished (for Chat)."""
        choice = chat_pb2.Choice(index=self.index, finish_reason=self._finish_reason, message=chat_pb2.AssistantMessage(
            role="assistant", content="".join(self._text),
            tool_calls=[tool_call_message(call) for call in self._tool_calls]))
        if self._want_logprobs:
            choice.logprobs.CopyFrom(logprobs_message(self._logprobs))
        return choice
