"""Turns a step's scheduled chunks into the decoder's packed batch and runs it."""

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
        (recomputed after a preemption, or a decode with drafts to verify) is one entry per token, each
        a decode as when it was (or would be) made one at a time, so its attention rounds as it does
        then and the sequence's results do not change. Logits come at each chunk's last token and at
        each of its drafts."""
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        starts = [0]
        logits_rows: list[int] = []
        split = False  # a chunk became several entries: logits only at the rows asked for
        bs = self.block_size
        for chunk in chunks:
            seq = chunk.seq
            begin, end = seq.num_computed, seq.num_computed + chunk.num_rows
            table = seq.blocks.block_ids
            token_ids.extend(seq.token_ids[begin:begin + chunk.num_tokens])
            token_ids.extend(chunk.drafts)
            positions.extend(range(begin, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(begin, end))
            ends = [end] if chunk.is_prompt else range(begin + 1, end + 1)
            split = split or len(ends) > 1
            seq_lens.extend(ends)
            tables.extend(table for _ in ends)
            first = starts[-1]
            starts.extend(first + e - begin for e in ends)
            logits_rows.extend(range(first + chunk.num_rows - 1 - len(chunk.drafts), first + chunk.num_rows))
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
            logits_rows=torch.tensor(logits_rows, device=device) if split else None,
        )

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Logits [sum(1 + len(c.drafts)), V] (fp32): at each chunk's last token, then at its drafts."""
        return self.model.forward(self.prepare(chunks), self.kv_cache)
