"""The synchronous heart of the engine: one `step()` schedules, runs the decoder, samples, detokenizes,
matches stops and reports what each request gained. It runs on one worker thread (engine.py)."""

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mistral_grpc import _C
from mistral_grpc.engine.block_manager import BlockManager
from mistral_grpc.engine.model_runner import ModelRunner
from mistral_grpc.engine.request import ChoiceDelta, GenerationOutput, GenerationRequest, TokenLogprob, TopLogprob
from mistral_grpc.engine.sampler import Sampler, SamplerOutput
from mistral_grpc.engine.sampling_params import SamplingParams
from mistral_grpc.engine.scheduler import ScheduledChunk, Scheduler
from mistral_grpc.engine.sequence import Sequence, SequenceStatus
from mistral_grpc.engine.speculative import DraftCounts, Drafter, NgramIndex, SpeculativeConfig, prediction_index
from mistral_grpc.engine.structured import GrammarCompiler, GrammarState, InvalidSchemaError
from mistral_grpc.metrics import (GENERATION_TOKENS, INTER_TOKEN_LATENCY, PREEMPTIONS, PROMPT_TOKENS,
                                  SPEC_ACCEPTED_TOKENS, SPEC_DRAFT_TOKENS, TIME_TO_FIRST_TOKEN)
from mistral_grpc.model.decoder import MistralDecoder
from mistral_grpc.tokenizer import IncrementalDetokenizer, MistralTokenizer

Emit = Callable[[GenerationOutput | Exception], None]
Held = Callable[[], bool]  # True while the caller has not taken enough of what was emitted
_GOLDEN = 0x9E3779B97F4A7C15  # spreads the choices of one request over unrelated Philox keys


@dataclass(eq=False)
class _Choice:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    stop: "_C.StopMatcher | None"
    last_token_time: float | None = None
    # v0.3: after the [TOOL_CALLS] token the text is a JSON payload, held back and parsed at the end.
    tool_text: str | None = None
    grammar: GrammarState | None = None  # structured output: which tokens may come next


@dataclass(eq=False)
class _Request:
    request: GenerationRequest
    emit: Emit
    held: Held
    choices: list[_Choice] = field(default_factory=list)
    first_token_time: float | None = None
    drafts: DraftCounts = field(default_factory=DraftCounts)

    @property
    def finished(self) -> bool:
        return all(c.seq.status is SequenceStatus.FINISHED for c in self.choices)


class EngineCore:
    def __init__(self, model: MistralDecoder, tokenizer: MistralTokenizer, num_blocks: int, block_size: int,
                 max_batch_size: int, max_prefill_tokens: int, speculative: SpeculativeConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.blocks = BlockManager(num_blocks, block_size)
        self.speculative = speculative
        self.scheduler = Scheduler(self.blocks, max_batch_size, max_prefill_tokens, speculative)
        self.runner = ModelRunner(model, model.allocate_kv_cache(num_blocks, block_size), block_size)
        self.sampler = Sampler(tokenizer.vocab_size)
        self.grammars = GrammarCompiler(tokenizer)
        self._requests: dict[str, _Request] = {}
        self._next_seq_id = 0

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def held_requests(self) -> set[str]:
        """The requests whose callers have not taken enough of their outputs (see add_request)."""
        return {request_id for request_id, state in self._requests.items() if state.held()}

    def num_running_requests(self, held: set[str]) -> int:
        """Requests with sequences in the running batch, not counting the held ones."""
        return len({s.request_id for s in self.scheduler.running} - held)

    def add_request(self, request: GenerationRequest, max_tokens: int, emit: Emit,
                    held: Held = lambda: False) -> None:
        """Queues a request; `emit` receives its outputs. While `held()` is true its sequences sit out
        the steps (a stream whose reader stopped reading: see engine.py's _Backlog)."""
        params = request.params
        try:
            grammars = (self.grammars.new_states(params.structured, params.n) if params.structured is not None
                        else [None] * params.n)
        except InvalidSchemaError as error:  # the server compiles first; a direct caller learns here
            emit(error)
            return
        base_seed = params.seed if params.seed is not None else secrets.randbits(63)
        prediction = prediction_index(request.prediction) if request.prediction is not None else None
        state = _Request(request, emit, held)
        now = time.monotonic()
        for index in range(params.n):
            seq = Sequence(self._next_seq_id, request.request_id, index, list(request.prompt_token_ids),
                           len(request.prompt_token_ids), params, (base_seed + index * _GOLDEN) % 2**63,
                           max_tokens, now)
            self._next_seq_id += 1
            if index > 0:
                seq.waits_for = state.choices[0].seq
            seq.drafter = self._drafter(prediction)
            stop = _C.StopMatcher(list(params.stop)) if params.stop else None
            state.choices.append(_Choice(seq, self.tokenizer.detokenizer(), stop, grammar=grammars[index]))
            self.scheduler.add(seq)
        self._requests[request.request_id] = state
        if request.metered:
            PROMPT_TOKENS.inc(len(request.prompt_token_ids))

    def _drafter(self, prediction: NgramIndex | None) -> Drafter | None:
        """A choice's drafter (the request's choices share its prediction), or None where speculation is off."""
        config = self.speculative
        if config is None or not config.enabled or (prediction is None and not config.prompt_lookup):
            return None
        return Drafter(config, prediction)

    def abort_request(self, request_id: str) -> None:
        state = self._requests.pop(request_id, None)
        if state is None:
            return
        for choice in state.choices:
            if choice.seq.status is not SequenceStatus.FINISHED:
                self.scheduler.finish(choice.seq, None)

    def fail_all(self, error: Exception) -> None:
        """Ends every request with `error` and frees all their blocks (after a failed step)."""
        for request_id, state in list(self._requests.items()):
            self.abort_request(request_id)
            state.emit(error)

    def step(self) -> bool:
        """One step of the model; False when there was nothing it could run (every request with work
        left is held, or waits for blocks that held requests keep)."""
        plan = self.scheduler.schedule(self.held_requests())
        PREEMPTIONS.inc(len(plan.preempted))
        if not plan.chunks:
            return False
        logits = self.runner.run(plan.chunks)
        rows: list[int] = []  # the logits rows that sample: all of each chunk that reaches its sequence's end
        num_rows = 0
        for chunk in plan.chunks:
            if chunk.samples:
                rows.extend(range(num_rows, num_rows + 1 + len(chunk.drafts)))
            num_rows += 1 + len(chunk.drafts)
        sampling = [c for c in plan.chunks if c.samples]
        for chunk in plan.chunks:
            chunk.seq.num_computed += chunk.num_tokens
            # Prompt blocks only: a generated token's KV comes from the decode kernels, a prompt's from
            # the prompt ones, and a later prompt that shared it would not get what it computes itself.
            self.blocks.register_full_blocks(chunk.seq.blocks, chunk.seq.token_ids,
                                             min(chunk.seq.num_computed, chunk.seq.prompt_len))
        if sampling:
            if len(rows) < num_rows:  # some chunks end mid-prompt: their logits are not used
                logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
            self._sample_and_emit(logits, sampling)
        return True

    def _sample_and_emit(self, logits: torch.Tensor, chunks: list[ScheduledChunk]) -> None:
        """Picks each sequence's next tokens from its rows of logits (one, and one per draft: drafts are
        accepted while the drawn token equals them) and emits what each request gained."""
        rows = [row for chunk in chunks for row in _verification_rows(chunk)]
        grammars = [self._requests[c.seq.request_id].choices[c.seq.index].grammar for c in chunks]
        allowed = self.grammars.bitmask(grammars, [c.drafts for c in chunks])
        result = self.sampler.sample(logits, rows, allowed)
        now = time.monotonic()
        touched: dict[str, list[ChoiceDelta]] = {}
        metered = 0
        first_row = 0
        for chunk in chunks:
            seq = chunk.seq
            state = self._requests[seq.request_id]
            choice = state.choices[seq.index]
            delta = self._commit(choice, chunk.drafts, result, first_row)
            first_row += 1 + len(chunk.drafts)
            if chunk.drafts:
                self._settle_drafts(state, chunk, _leading_matches(delta.token_ids, chunk.drafts))
            if state.request.metered:
                metered += len(delta.token_ids)
                self._observe_latency(state, choice, now, len(delta.token_ids))
            if state.first_token_time is None:
                state.first_token_time = now
            choice.last_token_time = now
            touched.setdefault(seq.request_id, []).append(delta)
        GENERATION_TOKENS.inc(metered)
        for request_id, deltas in touched.items():
            state = self._requests[request_id]
            completion = sum(c.seq.num_output for c in state.choices)
            state.emit(GenerationOutput(deltas, len(state.request.prompt_token_ids), completion, state.finished,
                                        state.drafts.accepted, state.drafts.rejected))
            if state.finished:
                del self._requests[request_id]

    def _commit(self, choice: _Choice, drafts: tuple[int, ...], result: SamplerOutput,
                first_row: int) -> ChoiceDelta:
        """Appends the drawn token of each of the choice's rows while it equals the draft its row
        verifies: the first that differs (or the one after the last draft) is the last. The choice may
        end at any of them (EOS, a stop string, max_tokens); what would follow is dropped."""
        delta = ChoiceDelta(choice.seq.index)
        for j in range(len(drafts) + 1):
            at_start = choice.detokenizer.at_start
            token = result.tokens[first_row + j]
            self._append_token(choice, token, delta)
            if choice.seq.params.logprobs:
                delta.logprobs.append(self._logprob(result, first_row + j, at_start))
            if choice.seq.status is SequenceStatus.FINISHED or j == len(drafts) or token != drafts[j]:
                break
        return delta

    def _settle_drafts(self, state: _Request, chunk: ScheduledChunk, accepted: int) -> None:
        """After a verification: the accepted drafts' KV (written by their rows) counts as computed, the
        blocks that only rejected drafts used go back, and the counts and the drafter learn the outcome."""
        seq = chunk.seq
        seq.num_computed += accepted
        if seq.status is not SequenceStatus.FINISHED:  # a finished one has given all its blocks back
            self.blocks.trim(seq.blocks, len(seq.token_ids))
        seq.drafter.record(len(chunk.drafts), accepted)
        state.drafts.add(len(chunk.drafts), accepted)
        if state.request.metered:
            SPEC_DRAFT_TOKENS.inc(len(chunk.drafts))
            SPEC_ACCEPTED_TOKENS.inc(accepted)

    @staticmethod
    def _observe_latency(state: _Request, choice: _Choice, now: float, num_tokens: int) -> None:
        """Time to first token, and the gaps between tokens: a step that brings several tokens of a
        choice (accepted drafts) spreads its gap over them."""
        if state.first_token_time is None:
            TIME_TO_FIRST_TOKEN.observe(now - choice.seq.arrival_time)
        if choice.last_token_time is not None:
            gap = (now - choice.last_token_time) / num_tokens
            for _ in range(num_tokens):
                INTER_TOKEN_LATENCY.observe(gap)

    def _append_token(self, choice: _Choice, token: int, delta: ChoiceDelta) -> None:
        """Adds a token to the choice and what it brings (text, the finish) to `delta`."""
        seq = choice.seq
        seq.token_ids.append(token)
        # EOS ends the choice, so the grammar never needs it; any other token was allowed by the mask.
        if choice.grammar is not None and token != self.tokenizer.eos_id and not choice.grammar.accept(token):
            raise RuntimeError(f"sampled token {token}, which request {seq.request_id}'s grammar forbids")
        delta.token_ids.append(token)
        reason = None
        if token == self.tokenizer.eos_id:
            text, reason = self._release(choice, choice.detokenizer.flush(), final=True), "stop"
        else:
            if token == self.tokenizer.tool_calls_token_id and choice.tool_text is None:
                choice.tool_text = ""
            text = self._release(choice, choice.detokenizer.push(token), final=False)
            if choice.stop is not None and choice.stop.stopped:
                reason = "stop"
            elif seq.num_output >= seq.max_tokens:
                text += self._release(choice, choice.detokenizer.flush(), final=True)
                reason = "length"
        if choice.tool_text is None:
            delta.text += text
        else:
            choice.tool_text += text
            if reason is not None:
                delta.text, delta.tool_calls = self.tokenizer.parse_tool_calls(choice.tool_text)
                if delta.tool_calls and reason == "stop":
                    reason = "tool_calls"
        if reason is not None:
            delta.finish_reason = reason
            self.scheduler.finish(seq, reason)

    @staticmethod
    def _release(choice: _Choice, text: str, final: bool) -> str:
        """Passes decoded text through the stop matcher: what is safe to send now (all of it at the end)."""
        if choice.stop is None:
            return text
        released = choice.stop.push(text)
        if final and not choice.stop.stopped:
            released += choice.stop.flush()
        return released

    def _logprob(self, result: SamplerOutput, row: int, at_start: bool) -> TokenLogprob:
        top = [TopLogprob(**self._token_surface(t, at_start), logprob=lp) for t, lp in result.top[row]]
        return TokenLogprob(**self._token_surface(result.tokens[row], at_start), logprob=result.logprobs[row],
                            top_logprobs=top)

    def _token_surface(self, token: int, at_start: bool) -> dict:
        """A token's text and UTF-8 bytes for logprobs as the reply's text has them (a byte-fallback
        token may be part of a character; the first token's leading space is dropped, as in content)."""
        raw = self.tokenizer.token_bytes(token, at_start)
        return {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw)}


@dataclass(frozen=True)
class _DraftRow:
    """What the sampler reads for a row verifying a draft: the sequence as it stands once the drafts
    before the row are accepted, so the row draws with the key, and the penalties, of that position."""

    seq: Sequence
    drafts: tuple[int, ...]  # the drafts before this row

    @property
    def params(self) -> SamplingParams:
        return self.seq.params

    @property
    def seed(self) -> int:
        return self.seq.seed

    @property
    def prompt_len(self) -> int:
        return self.seq.prompt_len

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids + list(self.drafts)


def _verification_rows(chunk: ScheduledChunk) -> list[Sequence | _DraftRow]:
    """The sampler's rows of a chunk that samples: its sequence, then one per draft."""
    return [chunk.seq] + [_DraftRow(chunk.seq, chunk.drafts[:j]) for j in range(1, len(chunk.drafts) + 1)]


def _leading_matches(tokens: list[int], drafts: tuple[int, ...]) -> int:
    """How many drafts, from the first, the drawn tokens equal: the accepted ones."""
    return next((j for j, (token, draft) in enumerate(zip(tokens, drafts)) if token != draft),
                min(len(tokens), len(drafts)))
