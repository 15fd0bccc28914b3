"""Continuous batching decisions, without a model: chunked prefill, decode, preemption, sharing."""

from mistral_grpc.engine.block_manager import BlockManager
from mistral_grpc.engine.sampling_params import SamplingParams
from mistral_grpc.engine.scheduler import Scheduler
from mistral_grpc.engine.sequence import Sequence, SequenceStatus

_ids = iter(range(10**6))


def make_seq(prompt_len: int, request_id: str = "r", index: int = 0, first_token: int | None = None) -> Sequence:
    """A sequence whose prompt shares no block with any other unless `first_token` is given."""
    seq_id = next(_ids)
    start = seq_id * 1000 if first_token is None else first_token
    return Sequence(seq_id, request_id, index, list(range(start, start + prompt_len)), prompt_len, SamplingParams(),
                    seed=0, max_tokens=100, arrival_time=0.0)


def run_step(sched: Scheduler, new_token: int = 7) -> list[tuple[Sequence, int]]:
    """Applies a step as the engine would: computed tokens advance, sampling chunks append a token."""
    plan = sched.schedule()
    done = [(c.seq, c.num_tokens, c.samples) for c in plan.chunks]
    for seq, n, samples in done:
        seq.num_computed += n
        sched.blocks.register_full_blocks(seq.blocks, seq.token_ids, seq.num_computed)
        if samples:
            seq.token_ids.append(new_token)
    return [(seq, n) for seq, n, _ in done]


def test_long_prompt_is_prefilled_in_chunks_while_others_decode() -> None:
    sched = Scheduler(BlockManager(64, 4), max_batch_size=8, max_prefill_tokens=8)
    short = make_seq(3)
    sched.add(short)
    assert run_step(sched) == [(short, 3)]
    long = make_seq(20)
    sched.add(long)
    assert run_step(sched) == [(short, 1), (long, 8)]  # decodes, then the prompt-token budget
    assert run_step(sched) == [(short, 1), (long, 8)]
    assert run_step(sched) == [(short, 1), (long, 4)]
    assert long.num_output == 1 and run_step(sched) == [(short, 1), (long, 1)]


def test_batch_size_bounds_admission() -> None:
    sched = Scheduler(BlockManager(64, 4), max_batch_size=2, max_prefill_tokens=100)
    seqs = [make_seq(2) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    assert [s for s, _ in run_step(sched)] == seqs[:2]
    assert seqs[2].status is SequenceStatus.WAITING
    sched.finish(seqs[0], "stop")
    assert [s for s, _ in run_step(sched)] == [seqs[1], seqs[2]]


def test_running_out_of_blocks_preempts_the_newest_and_recomputes_it() -> None:
    sched = Scheduler(BlockManager(5, 2), max_batch_size=4, max_prefill_tokens=100)
    old, new = make_seq(3), make_seq(3)
    sched.add(old)
    run_step(sched)
    sched.add(new)
    run_step(sched)  # old decodes within its 2 blocks; new is admitted with 2 (1 spare block kept)
    run_step(sched)  # old grows into the spare block: all 5 used
    assert sched.blocks.num_free_blocks == 0
    plan = sched.schedule()  # new needs a 3rd block: it is the newest, so it is the one preempted
    assert plan.preempted == [new] and new.status is SequenceStatus.WAITING and new.num_computed == 0
    assert [c.seq for c in plan.chunks] == [old]
    assert list(sched.waiting) == [new] and len(new.token_ids) == 5  # recomputed with its output so far


def test_sibling_choices_wait_for_the_first_and_share_its_prompt_blocks() -> None:
    sched = Scheduler(BlockManager(64, 4), max_batch_size=8, max_prefill_tokens=100)
    first, second = make_seq(10, "n", 0, first_token=1), make_seq(10, "n", 1, first_token=1)
    second.waits_for = first
    sched.add(first)
    sched.add(second)
    assert run_step(sched) == [(first, 10)]
    assert run_step(sched) == [(first, 1), (second, 2)]  # 8 prompt tokens come from first's blocks
    assert second.blocks.block_ids[:2] == first.blocks.block_ids[:2]


def test_finish_frees_everything() -> None:
    sched = Scheduler(BlockManager(16, 4), max_batch_size=4, max_prefill_tokens=100)
    seqs = [make_seq(5) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    run_step(sched)
    for s in seqs:
        sched.finish(s, None)
    assert sched.blocks.num_used_blocks == 0 and not sched.has_work
