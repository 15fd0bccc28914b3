"""Continuous batching decisions, without a model: chunked prefill, decode, preemption, sharing."""

from mistral_grpc.engine.block_manager import BlockManager
from mistral_grpc.engine.sampling_params import SamplingParams
from mistral_grpc.engine.scheduler import MIN_PROMPT_CHUNK, Scheduler
from mistral_grpc.engine.sequence import Sequence, SequenceStatus

_ids = iter(range(10**6))


def make_seq(prompt_len: int, request_id: str = "r", index: int = 0, first_token: int | None = None) -> Sequence:
    """A sequence whose prompt shares no block with any other unless `first_token` is given."""
    seq_id = next(_ids)
    start = seq_id * 1000 if first_token is None else first_token
    return Sequence(seq_id, request_id, index, list(range(start, start + prompt_len)), prompt_len, SamplingParams(),
                    seed=0, max_tokens=100, arrival_time=0.0)


def run_step(sched: Scheduler, new_token: int = 7, held: frozenset[str] = frozenset()) -> list[tuple[Sequence, int]]:
    """Applies a step as the engine would: computed tokens advance, sampling chunks append a token."""
    plan = sched.schedule(held)
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
    # The prompt-token budget beside the decodes, prompt chunks listed first (the decoder's prompt rows).
    assert run_step(sched) == [(long, 8), (short, 1)]
    assert run_step(sched) == [(long, 8), (short, 1)]
    assert run_step(sched) == [(long, 4), (short, 1)]
    assert long.num_output == 1 and run_step(sched) == [(short, 1), (long, 1)]


def test_batch_size_bounds_admission() -> None:
    sched = Scheduler(BlockManager(64, 4), max_batch_size=2, max_prefill_tokens=100)
    seqs = [make_seq(2) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    assert [s for s, _ in run_step(sched)] == seqs[:2]
    assert seqs[2].status is SequenceStatus.WAITING
    sched.finish(seqs[0], "stop")
    assert [s for s, _ in run_step(sched)] == [seqs[2], seqs[1]]  # the admitted prompt, then the decode


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
    first, second = make_seq(40, "n", 0, first_token=1), make_seq(40, "n", 1, first_token=1)
    second.waits_for = first
    sched.add(first)
    sched.add(second)
    assert run_step(sched) == [(first, 40)]
    # 24 prompt tokens come from first's blocks; the last MIN_PROMPT_CHUNK are computed again.
    assert run_step(sched) == [(second, MIN_PROMPT_CHUNK), (first, 1)]
    assert second.blocks.block_ids[:6] == first.blocks.block_ids[:6]


def test_finish_frees_everything() -> None:
    sched = Scheduler(BlockManager(16, 4), max_batch_size=4, max_prefill_tokens=100)
    seqs = [make_seq(5) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    run_step(sched)
    for s in seqs:
        sched.finish(s, None)
    assert sched.blocks.num_used_blocks == 0 and not sched.has_work


def test_a_prompt_is_split_only_into_chunks_attention_treats_as_prefill() -> None:
    """Chunks of MIN_PROMPT_CHUNK tokens or more (a shorter one only as a whole prompt), so a prompt
    token's attention rounds the same whatever split the other requests' budget use made."""
    sched = Scheduler(BlockManager(256, 16), max_batch_size=8, max_prefill_tokens=64)
    early, late = make_seq(50), make_seq(70)
    sched.add(early)
    sched.add(late)
    # 64 tokens: early's 50, then 14 left would make a 14-token chunk of late: late waits instead.
    assert run_step(sched) == [(early, 50)]
    # 64 of late's 70 would leave 6: it takes 54, then the last 16.
    assert run_step(sched) == [(late, 54), (early, 1)]
    assert run_step(sched) == [(late, 16), (early, 1)]
    short = make_seq(5)
    sched.add(short)
    assert run_step(sched) == [(short, 5), (early, 1), (late, 1)]  # a whole short prompt


def test_a_recomputed_sequence_chunks_its_prompt_apart_from_its_output() -> None:
    sched = Scheduler(BlockManager(64, 4), max_batch_size=8, max_prefill_tokens=100)
    seq = make_seq(20)
    sched.add(seq)
    run_step(sched)
    for _ in range(5):
        run_step(sched)
    sched._preempt(seq, sched.schedule())  # as when blocks run out
    assert seq.num_computed == 0 and len(seq.token_ids) == 26
    plan = sched.schedule()  # readmitted: the prefix cache may hold some of its prompt's blocks
    assert [(c.seq, c.num_tokens, c.is_prompt) for c in plan.chunks] == [(seq, 20 - seq.num_computed, True)]
    # ... but leaves a prefill's worth of the prompt to compute, not a decode-sized rest (12 tokens of 20
    # when the rule counted the generated tokens in).
    assert seq.num_computed > 0 and 20 - seq.num_computed >= MIN_PROMPT_CHUNK
    seq.num_computed = 20
    plan = sched.schedule()
    assert [(c.seq, c.num_tokens, c.is_prompt) for c in plan.chunks] == [(seq, 6, False)]


def test_a_held_request_sits_out_and_leaves_its_place_in_the_batch() -> None:
    """A request whose caller stopped taking its outputs (engine.py's _Backlog) computes nothing,
    keeps its blocks, and does not count against max_batch_size; it resumes where it stopped."""
    sched = Scheduler(BlockManager(64, 4), max_batch_size=2, max_prefill_tokens=100)
    stalled, busy, newcomer = make_seq(3, "stalled"), make_seq(3, "busy"), make_seq(3, "newcomer")
    for s in (stalled, busy, newcomer):
        sched.add(s)
    assert [s for s, _ in run_step(sched)] == [stalled, busy]
    blocks = list(stalled.blocks.block_ids)
    held = frozenset({"stalled"})
    assert run_step(sched, held=held) == [(newcomer, 3), (busy, 1)]
    assert run_step(sched, held=held) == [(busy, 1), (newcomer, 1)]
    assert stalled.status is SequenceStatus.RUNNING and stalled.blocks.block_ids == blocks
    assert stalled.num_output == 1 and stalled.num_computed == 3
    assert run_step(sched) == [(stalled, 1), (busy, 1), (newcomer, 1)]  # caught up: all three decode


def test_running_out_of_blocks_preempts_a_held_sequence_first() -> None:
    sched = Scheduler(BlockManager(5, 2), max_batch_size=4, max_prefill_tokens=100)
    stalled, busy = make_seq(3, "stalled"), make_seq(3, "busy")
    sched.add(stalled)
    run_step(sched)
    sched.add(busy)
    run_step(sched)
    run_step(sched)  # stalled grows into the spare block: all 5 used
    assert sched.blocks.num_free_blocks == 0
    plan = sched.schedule(frozenset({"stalled"}))  # busy needs a 3rd block: the held one gives way, not busy
    assert plan.preempted == [stalled] and [c.seq for c in plan.chunks] == [busy]
    assert run_step(sched, held=frozenset({"stalled"})) == [(busy, 1)]  # not readmitted while held
    assert list(sched.waiting) == [stalled]
