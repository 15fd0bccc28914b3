"""KV cache block bookkeeping: reference-counted blocks and a prefix cache over full blocks.

A block that fills up gets a hash chained over its tokens and every token before it, so two
sequences that start with the same tokens (a shared system prompt, the earlier turns of a chat,
the n choices of one request) share those blocks instead of computing them again. A block no
sequence holds stays cached, but counts as free: allocation evicts the least recently freed first.
"""

from collections import OrderedDict
from dataclasses import dataclass, field


def chain_hash(prev_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((prev_hash, token_ids))


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    content_hash: int | None = None  # set once the block is full and registered in the cache
    token_ids: tuple[int, ...] = ()  # kept with the hash so a collision can never alias two prefixes


@dataclass
class BlockTable:
    """One sequence's blocks, in order, and how many of its leading blocks are registered full."""

    block_ids: list[int] = field(default_factory=list)
    num_hashed: int = 0
    last_hash: int | None = None


class NoFreeBlocksError(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._blocks = [Block(i) for i in range(num_blocks)]
        # Every block with ref_count 0, oldest first: uncached ones and evictable cached ones alike.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cache: dict[int, int] = {}  # content hash -> block id

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, table: BlockTable, token_ids: list[int], min_computed: int = 1) -> int:
        """Gives an empty table blocks for `token_ids`, reusing cached prefix blocks.

        Returns how many leading tokens are already in the cache. At least `min_computed` tokens (and
        always the last one, whose logits are needed) are left to compute, into fresh blocks.
        """
        assert not table.block_ids, "allocate() takes an empty block table"
        needed = self.blocks_needed(len(token_ids))
        reusable: list[int] = []
        prev_hash: int | None = None
        for i in range(max(0, len(token_ids) - max(1, min_computed)) // self.block_size):
            chunk = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = chain_hash(prev_hash, chunk)
            block_id = self._cache.get(h)
            if block_id is None or self._blocks[block_id].token_ids != chunk:
                break
            reusable.append(block_id)
            prev_hash = h
        fresh = needed - len(reusable)
        evictable_hits = sum(1 for b in reusable if self._blocks[b].ref_count == 0)
        if fresh > self.num_free_blocks - evictable_hits:
            raise NoFreeBlocksError(f"need {fresh} free KV blocks, have {self.num_free_blocks - evictable_hits}")
        for block_id in reusable:
            self._add_reference(block_id)
        table.block_ids = reusable + [self._take_free() for _ in range(fresh)]
        table.num_hashed = len(reusable)
        table.last_hash = prev_hash
        return len(reusable) * self.block_size

    def can_allocate(self, num_tokens: int, reserve: int = 0) -> bool:
        """Conservative: ignores prefix hits (they only lower the need)."""
        return self.blocks_needed(num_tokens) + reserve <= self.num_free_blocks

    def append_slots(self, table: BlockTable, total_tokens: int) -> None:
        """Grows the table so it can hold `total_tokens` tokens."""
        missing = self.blocks_needed(total_tokens) - len(table.block_ids)
        if missing > self.num_free_blocks:
            raise NoFreeBlocksError(f"need {missing} free KV blocks, have {self.num_free_blocks}")
        table.block_ids.extend(self._take_free() for _ in range(missing))

    def trim(self, table: BlockTable, total_tokens: int) -> None:
        """Returns the table's blocks past the first `total_tokens` tokens (those of rejected draft
        tokens: never registered in the prefix cache, held by this table alone)."""
        keep = self.blocks_needed(total_tokens)
        while len(table.block_ids) > keep:
            block = self._blocks[table.block_ids.pop()]
            assert block.ref_count == 1 and block.content_hash is None, f"block {block.block_id} is shared"
            block.ref_count = 0
            self._free[block.block_id] = None

    def register_full_blocks(self, table: BlockTable, token_ids: list[int], num_computed: int) -> None:
        """Publishes the table's blocks that are full and computed, so later sequences can share them."""
        while (table.num_hashed + 1) * self.block_size <= num_computed:
            i = table.num_hashed
            chunk = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = chain_hash(table.last_hash, chunk)
            block = self._blocks[table.block_ids[i]]
            if h not in self._cache:  # else an identical block is cached already: keep that one
                self._cache[h] = block.block_id
                block.content_hash, block.token_ids = h, chunk
            table.num_hashed += 1
            table.last_hash = h

    def free(self, table: BlockTable) -> None:
        """Drops the table's references; blocks nobody holds go back to the free list (newest last)."""
        for block_id in reversed(table.block_ids):
            block = self._blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed more often than held"
            if block.ref_count == 0:
                self._free[block_id] = None
        table.block_ids = []
        table.num_hashed = 0
        table.last_hash = None

    def _add_reference(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.content_hash is not None:  # evict: it no longer holds that prefix
            if self._cache.get(block.content_hash) == block_id:
                del self._cache[block.content_hash]
            block.content_hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id
