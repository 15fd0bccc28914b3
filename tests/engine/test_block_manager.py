"""Block allocation, reference counts and the prefix cache."""

import random

import pytest

from mistral_grpc.engine.block_manager import BlockManager, BlockTable, NoFreeBlocksError


def test_allocate_and_free_return_every_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    table = BlockTable()
    assert bm.allocate(table, list(range(10))) == 0
    assert len(table.block_ids) == 3 and bm.num_used_blocks == 3
    bm.append_slots(table, 13)
    assert len(table.block_ids) == 4
    bm.free(table)
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 8


def test_prefix_blocks_are_shared_but_never_the_last_tokens_block() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    first = BlockTable()
    prompt = list(range(100, 112))  # exactly 3 full blocks
    bm.allocate(first, prompt)
    bm.register_full_blocks(first, prompt, num_computed=12)
    second = BlockTable()
    # Same prompt: the block holding the last token is recomputed, the two before it are shared.
    assert bm.allocate(second, prompt) == 8
    assert second.block_ids[:2] == first.block_ids[:2] and second.block_ids[2] != first.block_ids[2]
    third = BlockTable()
    assert bm.allocate(third, prompt + [7, 8, 9]) == 12  # a longer prompt shares all three
    assert bm.num_used_blocks == 3 + 1 + 1
    for t in (first, second, third):
        bm.free(t)
    assert bm.num_used_blocks == 0


def test_a_prefix_hit_leaves_at_least_min_computed_tokens_to_compute() -> None:
    bm = BlockManager(num_blocks=32, block_size=4)
    first = BlockTable()
    prompt = list(range(100, 140))  # 10 full blocks
    bm.allocate(first, prompt)
    bm.register_full_blocks(first, prompt, num_computed=40)
    assert bm.allocate(BlockTable(), prompt, min_computed=16) == 24
    assert bm.allocate(BlockTable(), prompt, min_computed=40) == 0
    assert bm.allocate(BlockTable(), prompt + [1, 2], min_computed=16) == 24


def test_cached_blocks_nobody_holds_count_as_free_and_are_evicted_oldest_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    table = BlockTable()
    prompt = [1, 2, 3, 4, 5]
    bm.allocate(table, prompt)
    bm.register_full_blocks(table, prompt, 5)
    bm.free(table)
    assert bm.num_free_blocks == 4
    again = BlockTable()
    assert bm.allocate(again, prompt) == 4  # still cached
    bm.free(again)
    other = BlockTable()
    bm.allocate(other, [9] * 8)  # needs every block: evicts the cached prefix
    bm.free(other)
    assert bm.allocate(BlockTable(), prompt) == 0


def test_a_different_prefix_never_matches() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a = BlockTable()
    bm.allocate(a, [1, 2, 3, 4, 5])
    bm.register_full_blocks(a, [1, 2, 3, 4, 5], 5)
    assert bm.allocate(BlockTable(), [1, 2, 9, 4, 5]) == 2  # the second block differs: only the first is shared
    assert bm.allocate(BlockTable(), [7, 2, 3, 4, 5]) == 0


def test_out_of_blocks_is_an_error_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=2, block_size=2)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(BlockTable(), [1, 2, 3, 4, 5])
    assert bm.num_used_blocks == 0


def test_random_workload_leaves_zero_blocks_held() -> None:
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=4)
    live: list[tuple[BlockTable, list[int]]] = []
    for _ in range(500):
        if live and rng.random() < 0.4:
            table, _ = live.pop(rng.randrange(len(live)))
            bm.free(table)
            continue
        prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 20))]
        table = BlockTable()
        try:
            bm.allocate(table, prompt)
        except NoFreeBlocksError:
            continue
        bm.register_full_blocks(table, prompt, len(prompt))
        live.append((table, prompt))
    for table, _ in live:
        bm.free(table)
    assert bm.num_used_blocks == 0
