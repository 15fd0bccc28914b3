"""One choice being generated: its tokens, its place in the KV cache, and how it ends."""

import enum
from dataclasses import dataclass, field

from mistral_grpc.engine.block_manager import BlockTable
from mistral_grpc.engine.sampling_params import SamplingParams
from mistral_grpc.engine.speculative import Drafter


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its KV is recomputed on readmission)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # the choice index within its request (0..n-1)
    token_ids: list[int]  # prompt, then generated tokens
    prompt_len: int
    params: SamplingParams
    seed: int  # drawn by the engine when the request sets none
    max_tokens: int  # resolved budget of generated tokens
    arrival_time: float
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0  # leading tokens whose KV is in the cache
    blocks: BlockTable = field(default_factory=BlockTable)
    finish_reason: str | None = None
    # Sibling choices (index > 0) wait for choice 0's prefill, then reuse its blocks via the prefix cache.
    waits_for: "Sequence | None" = None
    drafter: Drafter | None = None  # proposes draft tokens to verify (speculative decoding); None = never

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def in_prefill(self) -> bool:
        return self.num_uncomputed > 1

    def reset_for_recompute(self) -> None:
        """After preemption: the cache holds nothing of it, its tokens so far become its prompt to recompute."""
        self.status = SequenceStatus.WAITING
        self.num_computed = 0
