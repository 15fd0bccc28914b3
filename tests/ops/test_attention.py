"""paged_attention against a plain-torch gather + masked softmax: prefill, chunked prefill and decode in
one batch, GQA, sliding windows, block tables out of order, odd lengths and head sizes."""

import math
from dataclasses import dataclass

import pytest
import torch

import reference
from mistral_grpc import ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

# (q_heads, kv_heads, head_dim, block_size): Mistral, its small test geometry, plain MHA, odd sizes.
GEOMETRIES = [(32, 8, 128, 16), (8, 2, 128, 16), (6, 6, 64, 5), (12, 4, 40, 7)]
# (seq_len, q_len): a prefill, decodes, chunked prefills, a whole-block prefill, a sequence with no
# queries this step, and a single-token prompt.
MIXED = [(37, 37), (100, 1), (50, 3), (130, 70), (16, 16), (5, 0), (1, 1)]


@dataclass
class Batch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor

    def run(self, scale: float, sliding_window: int, out: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.empty_like(self.q) if out is None else out
        ops.paged_attention(out, self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens,
                            self.query_start_loc, scale, sliding_window)
        return out

    def expected(self, scale: float, sliding_window: int) -> torch.Tensor:
        cpu = [t.cpu() for t in (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens,
                                 self.query_start_loc)]
        return reference.paged_attention(*cpu, scale, sliding_window).to(self.q.device)


def make_batch(seqs: list[tuple[int, int]], q_heads: int, kv_heads: int, head_dim: int, block_size: int,
               dtype: torch.dtype, device: str = "cpu") -> Batch:
    """Each sequence gets blocks from a shuffled pool, so block tables run out of order. Cache slots that
    hold no token are NaN and unused block-table entries are -1: reading either would show."""
    blocks_per_seq = [math.ceil(seq_len / block_size) for seq_len, _ in seqs]
    num_blocks = sum(blocks_per_seq) + 3
    pool = torch.randperm(num_blocks).tolist()
    block_tables = torch.full((len(seqs), max(blocks_per_seq) + 1), -1, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    for b, ((seq_len, _), needed) in enumerate(zip(seqs, blocks_per_seq)):
        block_tables[b, :needed] = torch.tensor([pool.pop() for _ in range(needed)], dtype=torch.int32)
        for pos in range(seq_len):
            block, offset = int(block_tables[b, pos // block_size]), pos % block_size
            k_cache[block, offset] = torch.randn(kv_heads, head_dim, dtype=dtype)
            v_cache[block, offset] = torch.randn(kv_heads, head_dim, dtype=dtype)
    q_lens = torch.tensor([q_len for _, q_len in seqs])
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0)]).int()
    q = torch.randn(int(q_lens.sum()), q_heads, head_dim, dtype=dtype)
    seq_lens = torch.tensor([seq_len for seq_len, _ in seqs], dtype=torch.int32)
    return Batch(*(t.to(device) for t in (q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sliding_window", [0, 20])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
def test_mixed_batch_matches_reference(device: str, dtype: torch.dtype, sliding_window: int,
                                       geometry: tuple[int, int, int, int]) -> None:
    q_heads, kv_heads, head_dim, block_size = geometry
    batch = make_batch(MIXED, q_heads, kv_heads, head_dim, block_size, dtype, device)
    scale = head_dim**-0.5
    torch.testing.assert_close(batch.run(scale, sliding_window), batch.expected(scale, sliding_window),
                               atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seqs", [[(517, 1), (1, 1), (64, 1)], [(300, 300)], [(613, 97), (77, 77)]],
                         ids=["decode", "prefill", "chunked"])
@pytest.mark.parametrize("sliding_window", [0, 1, 100])
def test_long_sequences_match_reference(device: str, dtype: torch.dtype, seqs: list[tuple[int, int]],
                                        sliding_window: int) -> None:
    batch = make_batch(seqs, 8, 2, 128, 16, dtype, device)
    torch.testing.assert_close(batch.run(0.3, sliding_window), batch.expected(0.3, sliding_window),
                               atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("geometry", [(8, 2, 128), (4, 4, 64), (6, 2, 96), (80, 1, 32)], ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("sliding_window", [0, 37])
def test_bf16_prefill_scores_match_reference(block_size: int, geometry: tuple[int, int, int],
                                             sliding_window: int) -> None:
    """On AMX CPUs bf16 prefill-like tasks score on the tile unit: 16 keys of one block read in place
    (block sizes 16, 32), keys copied where 16 span two blocks (8) or a tile ends part-way, 1 to 5
    blocks of 16 query rows (80 heads on one kv head), 1 to 4 blocks of 32 head dims."""
    q_heads, kv_heads, head_dim = geometry
    batch = make_batch([(200, 200), (90, 45), (33, 33)], q_heads, kv_heads, head_dim, block_size, torch.bfloat16)
    torch.testing.assert_close(batch.run(0.2, sliding_window), batch.expected(0.2, sliding_window),
                               atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])


def test_bf16_prefill_off_amx_matches_reference() -> None:
    """Below linear_cpu_isa's "amx" level bf16 prefill takes the vector path (the one CPUs without
    AMX run), so an AMX machine tests it too."""
    best = ops.linear_cpu_isa("best")
    if best != "amx":
        pytest.skip(f"this CPU runs the vector path anyway (best level {best})")
    batch = make_batch([(200, 200), (90, 45)], 8, 2, 128, 16, torch.bfloat16)
    ops.linear_cpu_isa("avx512_bf16")
    try:
        out = batch.run(0.2, 0)
    finally:
        ops.linear_cpu_isa("best")
    torch.testing.assert_close(out, batch.expected(0.2, 0), atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])
    assert not torch.equal(out, batch.run(0.2, 0))  # the AMX path sums in another order


def test_bf16_prefill_is_as_accurate_as_rounding_its_output() -> None:
    """Against fp64 math on the same bf16 inputs, a bf16 prefill's mean error is no more than that of
    rounding the exact result to bf16, with P V on AMX too: P goes in as two bf16 parts (rounding it
    to bf16 once made the mean error 1.4x this)."""
    batch = make_batch([(512, 512)], 8, 2, 128, 16, torch.bfloat16)
    scale = 128**-0.5
    out = batch.run(scale, 0).double()
    exact = reference.paged_attention(batch.q.double(), batch.k_cache.double(), batch.v_cache.double(),
                                      batch.block_tables, batch.seq_lens, batch.query_start_loc, scale, 0)
    rounding = (exact.bfloat16().double() - exact).abs().mean()
    assert (out - exact).abs().mean() <= 1.05 * rounding


@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("sliding_window", [0, 1000])
def test_result_does_not_depend_on_the_thread_count(threads: int, sliding_window: int) -> None:
    """With few sequences per thread, long decodes are split by key range and merged afterwards."""
    batch = make_batch([(1500, 1), (700, 2), (40, 3)], 8, 2, 128, 16, torch.bfloat16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = batch.run(0.1, sliding_window)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, batch.expected(0.1, sliding_window), atol=TOL[torch.bfloat16],
                               rtol=TOL[torch.bfloat16])


def _sub_batch(batch: Batch, parts: list[tuple[int, int, int]]) -> tuple[Batch, list[int]]:
    """A batch of (sequence b, first query i, queries n) parts of `batch` over the same caches: part
    (b, i, n) is sequence b's queries i..i+n with the cache filled up to the last of them. Returns it
    and the rows of batch.q its queries are."""
    rows, tables, seq_lens, starts = [], [], [], [0]
    for b, i, n in parts:
        first, q_len = int(batch.query_start_loc[b]), int(batch.query_start_loc[b + 1] - batch.query_start_loc[b])
        rows += range(first + i, first + i + n)
        tables.append(batch.block_tables[b])
        seq_lens.append(int(batch.seq_lens[b]) - q_len + i + n)
        starts.append(starts[-1] + n)
    sub = Batch(batch.q[rows].contiguous(), batch.k_cache, batch.v_cache, torch.stack(tables),
                torch.tensor(seq_lens, dtype=torch.int32), torch.tensor(starts, dtype=torch.int32))
    return sub, rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sliding_window", [0, 1000])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_querys_result_does_not_depend_on_the_rest_of_the_batch(dtype: torch.dtype, sliding_window: int,
                                                                 threads: int) -> None:
    """Bit for bit: a decode alone or among others (long ones split by key range), a prompt chunk
    whole or in parts of 16 queries or more, however many threads. The engine's seeds rely on it."""
    batch = make_batch([(1500, 1), (700, 1), (40, 1), (600, 40), (1100, 1), (90, 90)], 8, 2, 128, 16, dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        whole = batch.run(0.1, sliding_window)
        splits = [[(b, 0, 1)] for b in (0, 1, 2, 4)]  # each decode alone
        splits += [[(3, 0, 16), (3, 16, 24)], [(3, 0, 20)], [(3, 20, 20), (0, 0, 1)], [(5, 0, 50), (5, 50, 40)]]
        splits += [[(0, 0, 1), (1, 0, 1)], [(5, 0, 90), (4, 0, 1), (2, 0, 1)]]
        for parts in splits:
            sub, rows = _sub_batch(batch, parts)
            assert torch.equal(sub.run(0.1, sliding_window), whole[rows]), parts
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device", DEVICES)
def test_q_and_out_may_be_token_strided(device: str) -> None:
    """q sliced from a fused qkv projection and out written into a wider buffer, without copies."""
    batch = make_batch([(40, 9), (21, 1)], 8, 2, 64, 16, torch.float32, device)
    tokens = batch.q.shape[0]
    qkv = torch.randn(tokens, 12 * 64, device=device)
    qkv[:, : 8 * 64] = batch.q.reshape(tokens, -1)
    q = qkv[:, : 8 * 64].view(tokens, 8, 64)
    wide_out = torch.zeros(tokens, 9 * 64, device=device)
    out = wide_out[:, 64:].view(tokens, 8, 64)
    batch.q = q
    batch.run(0.125, 0, out)
    torch.testing.assert_close(out, batch.expected(0.125, 0))
    assert bool((wide_out[:, :64] == 0).all())


def test_attention_opcheck() -> None:
    batch = make_batch([(19, 19), (33, 1)], 4, 2, 32, 8, torch.bfloat16)
    batch.k_cache.nan_to_num_(0.0)
    batch.v_cache.nan_to_num_(0.0)
    args = (torch.empty_like(batch.q), batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
            batch.query_start_loc, 0.2, 0)
    torch.library.opcheck(torch.ops.mistral_grpc.paged_attention, args)


def _bad(change, message: str):
    return pytest.param(change, message, id=message[:40])


@pytest.mark.parametrize(
    "change, message",
    [
        _bad(lambda b: b.block_tables.__setitem__((0, 1), 99), r"block_tables\[0, 1\] = 99 is outside the cache's"),
        _bad(lambda b: b.block_tables.__setitem__((1, 0), -1), r"block_tables\[1, 0\] = -1 is outside"),
        _bad(lambda b: b.seq_lens.__setitem__(0, 2), "has 3 queries but seq_lens"),
        _bad(lambda b: b.seq_lens.__setitem__(1, 200), "needs more than the"),
        _bad(lambda b: b.query_start_loc.__setitem__(1, 5), "non-decreasing"),
        _bad(lambda b: b.query_start_loc.__setitem__(2, 9), "non-decreasing"),
        _bad(lambda b: setattr(b, "q", torch.randn(4, 7, 32)), "not a multiple"),
        _bad(lambda b: setattr(b, "q", torch.randn(4, 8, 16)), "head_dim"),
        _bad(lambda b: setattr(b, "q", torch.randn(8, 4, 32).transpose(0, 1)), "contiguous"),
        _bad(lambda b: setattr(b, "q", b.q.bfloat16()), "share a float dtype"),
        _bad(lambda b: setattr(b, "k_cache", b.k_cache.transpose(0, 1).contiguous().transpose(0, 1)),
             "k_cache must be contiguous"),
        _bad(lambda b: setattr(b, "v_cache", b.v_cache[:, :, :1].contiguous()), "must have k_cache's shape"),
        _bad(lambda b: setattr(b, "block_tables", b.block_tables.long()), "int32"),
        _bad(lambda b: setattr(b, "seq_lens", b.seq_lens[:1]), r"seq_lens must have shape \[2\]"),
        _bad(lambda b: setattr(b, "query_start_loc", b.query_start_loc.long()), "query_start_loc must be Int"),
    ],
)
def test_attention_rejects_bad_arguments(change, message: str) -> None:
    batch = make_batch([(20, 3), (40, 1)], 8, 2, 32, 16, torch.float32)
    change(batch)
    with pytest.raises(RuntimeError, match=message):
        batch.run(0.2, 0)


def test_attention_rejects_out_of_another_shape() -> None:
    batch = make_batch([(20, 3)], 8, 2, 32, 16, torch.float32)
    with pytest.raises(RuntimeError, match="out .* must have q's shape"):
        batch.run(0.2, 0, torch.empty(3, 8, 16))


@pytest.mark.cuda
def test_attention_rejects_q_on_another_device() -> None:
    batch = make_batch([(20, 3)], 8, 2, 32, 16, torch.float32)
    batch.q = batch.q.cuda()
    with pytest.raises(RuntimeError, match="one device"):
        batch.run(0.2, 0)
