"""Turns a step's scheduled chunks into the decoder's packed batch and runs it."""

import itertools

import torch

from mistral_grpc.engine.scheduler import ScheduledChunk
from mistral_grpc.model.decoder import BatchInput, KVCache, MistralDecoder


class ModelRunner:
    def __init__(self, model: MistralDecoder, kv_cache: KVCache, block_size: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size

    def prepare(self, chunks: list[ScheduledChunk]) -> BatchInput:
        """The packed batch: one attention entry per chunk, except that a chunk of generated tokens
        (recomputed after a preemption) is one entry per token, each a decode as when it was first
        made, so its attention rounds as it did then and the sequence's results do not change."""
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        starts = [0]
        split = False  # a chunk became several entries: logits only at each chunk's last token
        bs = self.block_size
        for chunk in chunks:
            seq = chunk.seq
            begin, end = seq.num_computed, seq.num_computed + chunk.num_tokens
            table = seq.blocks.block_ids
            token_ids.extend(seq.token_ids[begin:end])
            positions.extend(range(begin, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(begin, end))
            ends = [end] if chunk.is_prompt else range(begin + 1, end + 1)
            split = split or len(ends) > 1
            seq_lens.extend(ends)
            tables.extend(table for _ in ends)
            first = starts[-1]
            starts.extend(first + e - begin for e in ends)
        width = max(len(t) for t in tables)
        tables = [t + [0] * (width - len(t)) for t in tables]
        device = self.model.device
        return BatchInput(
            token_ids=torch.tensor(token_ids, dtype=torch.int64, device=device),
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            prompt_rows=sum(c.num_tokens for c in chunks if c.is_prompt),
            logits_rows=(torch.tensor(list(itertools.accumulate(c.num_tokens for c in chunks)), device=device) - 1
                         if split else None),
        )

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Logits [len(chunks), V] (fp32) at each chunk's last token."""
        return self.model.forward(self.prepare(chunks), self.kv_cache)
