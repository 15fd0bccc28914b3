"""What goes into the engine and what comes out of it, step by step, for one request.

The server turns a ChatRequest into a GenerationRequest (template + tokenize + SamplingParams) and
turns each GenerationOutput into response chunks. The engine owns detokenization and stop matching,
so a delta's text is final: already valid UTF-8, never part of a stop string.
"""

from dataclasses import dataclass, field

from mistral_grpc.engine.sampling_params import SamplingParams
from mistral_grpc.tokenizer import ToolCall


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    metered: bool = True  # False: counted in no metric (the engine's own warm-up)
    # The reply's expected tokens (OpenAI's predicted outputs): drafts to verify; they never change the reply.
    prediction: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: list[int]


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob] = field(default_factory=list)


@dataclass
class ChoiceDelta:
    """What one choice (of n) produced since the last output."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)  # v0.3, parsed whole on the last delta
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls", set on the choice's last delta


@dataclass
class GenerationOutput:
    """One step's news for a request: a delta per choice that changed, and the running usage."""

    deltas: list[ChoiceDelta]
    prompt_tokens: int
    completion_tokens: int  # all choices together, so far
    finished: bool = False  # every choice has finished: this is the request's last output
    # Speculative decoding, all choices so far: draft tokens the model drew (accepted) and did not (rejected).
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class EngineError(Exception):
    """Base of the errors the engine raises to its callers (the server maps each to a gRPC code)."""


class QueueFullError(EngineError):
    """The waiting queue is at --max-queue: RESOURCE_EXHAUSTED."""


class EngineUnavailableError(EngineError):
    """The engine is loading or draining: UNAVAILABLE."""


class EngineInternalError(EngineError):
    """A step failed inside the engine: INTERNAL (the details go to the server log only)."""


class PromptTooLongError(EngineError):
    """prompt + max_tokens exceeds the context: INVALID_ARGUMENT on `field`, naming both numbers."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field  # what to change: "messages" (a shorter conversation) or "max_tokens"


def generation_budget(max_tokens: int | None, prompt_len: int, context: int) -> int:
    """The tokens a request may generate (max_tokens, or all the context leaves), or PromptTooLongError
    when the prompt leaves the answer no room or max_tokens does not fit."""
    room = context - prompt_len
    if room < 1:
        raise PromptTooLongError(f"the prompt has {prompt_len} tokens and the context holds {context}: no room is "
                                 "left for the answer; shorten the conversation", "messages")
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise PromptTooLongError(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                                 f"{context} tokens; at most {room} tokens are left for the answer", "max_tokens")
    return max_tokens
