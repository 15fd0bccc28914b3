"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step decodes every running sequence (one token each), then spends a prompt-token budget on
prefill chunks (sequences already part-way first, then newcomers in arrival order), so a long
prompt never stalls the running streams. When the cache runs out of blocks for a decode, the
newest sequence is preempted: its blocks are freed and it is recomputed later.

A request is held while its caller has not taken enough of what it produced (a stream whose reader
stopped reading; engine.py's _Backlog): its sequences sit out the steps and leave their place in the
batch to others, keep their blocks unless the cache runs short (they are preempted first then), and
resume where they stopped.

What else is batched never changes a sequence's numbers (the seed contract): the decoder computes
prompt tokens and decode tokens each with kernels whose result for a row does not depend on the
other rows (ops.linear's prompt_rows), the step lists prompt chunks first so they form one block
of rows, and a prompt chunk is never so short that attention would take its decode path instead
(MIN_PROMPT_CHUNK; a prefix hit leaves at least that much of a prompt to compute). Preemption
changes nothing either: a readmitted sequence recomputes its prompt as a prefill and its generated
tokens as decode rows, each its own attention entry (model_runner.py), as they were first made.

Speculative decoding (speculative.py): a decoding sequence may bring draft tokens, verified as more
decode rows of its chunk. Drafts take only blocks that are free: they never preempt anyone, and the
blocks of those rejected go back after the step (core.py).
"""

from collections import deque
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from mistral_grpc.engine.block_manager import BlockManager, NoFreeBlocksError
from mistral_grpc.engine.sequence import Sequence, SequenceStatus
from mistral_grpc.engine.speculative import SpeculativeConfig

# paged_attention treats a sequence's chunk of q_len queries as a decode when q_len * group < 16; a
# prompt chunk at least this long is a prefill for any GQA group, so its rows round as in any other
# split of the same prompt. Shorter prompt chunks are only ever a whole prompt. (A prefill budget
# under twice this, which only tests set, lowers it to half the budget so prompts still progress.)
MIN_PROMPT_CHUNK = 16


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens computed this step, from seq.num_computed on
    drafts: tuple[int, ...] = ()  # proposed tokens after the sequence's last one, verified this step

    @property
    def num_rows(self) -> int:
        """Token rows of the step's batch: the chunk's tokens, then its drafts."""
        return self.num_tokens + len(self.drafts)

    @property
    def is_prompt(self) -> bool:
        """True for a chunk of the prompt (never mixed with generated tokens: see prefill_chunk)."""
        return self.seq.num_computed < self.seq.prompt_len

    @property
    def samples(self) -> bool:
        """True when the chunk reaches the sequence's last token, whose logits pick the next one."""
        return self.seq.num_computed + self.num_tokens == len(self.seq.token_ids)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_prefill_tokens: int,
                 speculative: SpeculativeConfig | None = None) -> None:
        self.blocks = blocks
        self.speculative = speculative
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.min_prompt_chunk = max(1, min(MIN_PROMPT_CHUNK, max_prefill_tokens // 2))
        # Admission keeps this many blocks spare so running sequences can grow without thrashing.
        self.watermark = max(1, blocks.num_blocks // 100)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the newest
        self.prefix_hit_tokens = 0  # prompt tokens the prefix cache spared us from computing
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str | None) -> None:
        """Retires a sequence (reason None = aborted) and returns its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.blocks)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def schedule(self, held: AbstractSet[str] = frozenset()) -> SchedulerOutput:
        """The next step. Sequences of the requests in `held` sit it out, keeping their blocks."""
        out = SchedulerOutput()
        self._schedule_decodes(out, held)
        budget = self.max_prefill_tokens
        for seq in self.running:
            if seq.in_prefill and budget > 0 and seq.request_id not in held:
                budget -= self._add_prefill_chunk(out, seq, budget)
        self._admit(out, budget, held)
        # Prompt chunks first: the decoder runs rows [0, prompt rows) on the prompt kernels.
        out.chunks.sort(key=lambda c: not c.is_prompt)
        return out

    def _add_prefill_chunk(self, out: SchedulerOutput, seq: Sequence, budget: int) -> int:
        """Schedules what `budget` allows of the sequence's uncomputed tokens; returns how many."""
        n = prefill_chunk(seq, budget, self.min_prompt_chunk)
        if n:
            out.chunks.append(ScheduledChunk(seq, n))
        return n

    def _schedule_decodes(self, out: SchedulerOutput, held: AbstractSet[str]) -> None:
        decoding = [s for s in self.running if not s.in_prefill and s.request_id not in held]
        draft_budget = (self.speculative.max_rows - len(decoding)
                        if self.speculative is not None and self.speculative.enabled else 0)
        for seq in decoding:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted as a victim earlier in this loop
            if draft_budget > 0 and (chunk := self._draft_chunk(seq, draft_budget, len(decoding))) is not None:
                out.chunks.append(chunk)
                draft_budget -= len(chunk.drafts)
                continue
            while True:
                try:
                    self.blocks.append_slots(seq.blocks, len(seq.token_ids))
                    out.chunks.append(ScheduledChunk(seq, 1))
                    break
                except NoFreeBlocksError:
                    victim = self._victim(held)
                    self._preempt(victim, out)
                    if victim is seq:
                        break

    def _draft_chunk(self, seq: Sequence, budget: int, reserve: int) -> ScheduledChunk | None:
        """The sequence's decode with drafts, if it proposes any and the free blocks hold them with
        `reserve` to spare (a block for each decode of the step: drafts must not cause a preemption)."""
        if seq.drafter is None:
            return None
        # The last draft's row draws token max_tokens at most: no verification outgrows the budget.
        limit = min(budget, seq.max_tokens - seq.num_output - 1)
        drafts = seq.drafter.propose(seq.token_ids, seq.prompt_len, limit) if limit > 0 else []
        total = len(seq.token_ids) + len(drafts)
        missing = self.blocks.blocks_needed(total) - len(seq.blocks.block_ids)
        if not drafts or missing + reserve > self.blocks.num_free_blocks:
            return None
        self.blocks.append_slots(seq.blocks, total)
        return ScheduledChunk(seq, 1, tuple(drafts))

    def _victim(self, held: AbstractSet[str]) -> Sequence:
        """The newest held sequence (it is idle anyway), else the newest running one."""
        return next((s for s in reversed(self.running) if s.request_id in held), self.running[-1])

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self.blocks.free(seq.blocks)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        out.chunks = [c for c in out.chunks if c.seq is not seq]
        out.preempted.append(seq)

    def _admit(self, out: SchedulerOutput, budget: int, held: AbstractSet[str]) -> None:
        # Held sequences compute nothing, so they leave their place in the batch to others.
        active = sum(1 for s in self.running if s.request_id not in held)
        for seq in list(self.waiting):
            if budget <= 0 or active >= self.max_batch_size:
                return
            if seq.request_id in held:
                continue  # preempted, and its caller has not taken what it made so far
            if seq.waits_for is not None:
                parent = seq.waits_for
                if parent.status is not SequenceStatus.FINISHED and parent.num_computed < parent.prompt_len:
                    continue  # its prompt blocks are not cached yet: sharing them beats computing them twice
                seq.waits_for = None
            if not self.blocks.can_allocate(len(seq.token_ids), reserve=self.watermark) and self.running:
                return  # first come, first served: nobody overtakes a request that does not fit yet
            try:
                # A prefix hit leaves at least min_prompt_chunk tokens of the prompt to compute (after a
                # preemption the generated ones come on top), so the rest of the prompt is a prefill.
                left = seq.num_output + self.min_prompt_chunk
                seq.num_computed = self.blocks.allocate(seq.blocks, seq.token_ids, left)
            except NoFreeBlocksError:
                return
            self.prefix_hit_tokens += seq.num_computed
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            active += 1
            budget -= self._add_prefill_chunk(out, seq, budget)


def prefill_chunk(seq: Sequence, budget: int, min_chunk: int) -> int:
    """Tokens of the sequence's next prefill chunk within `budget`, 0 for none this step. A chunk stays
    on one side of the prompt's end (after a preemption the generated tokens are recomputed too), and
    a prompt is split only into chunks of `min_chunk` tokens or more."""
    if seq.num_computed >= seq.prompt_len:
        return min(seq.num_uncomputed, budget)
    left = seq.prompt_len - seq.num_computed
    if left <= budget:
        return left
    n = min(budget, left - min_chunk)
    return n if n >= min_chunk else 0
