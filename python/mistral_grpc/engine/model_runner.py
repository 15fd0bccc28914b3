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
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        starts = [0]
        bs = self.block_size
        for chunk in chunks:
            seq = chunk.seq
            begin, end = seq.num_computed, seq.num_computed + chunk.num_tokens
            table = seq.blocks.block_ids
            token_ids.extend(seq.token_ids[begin:end])
            positions.extend(range(begin, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(begin, end))
            seq_lens.append(end)
            starts.append(starts[-1] + chunk.num_tokens)
        width = max(len(c.seq.blocks.block_ids) for c in chunks)
        tables = [c.seq.blocks.block_ids + [0] * (width - len(c.seq.blocks.block_ids)) for c in chunks]
        device = self.model.device
        return BatchInput(
            token_ids=torch.tensor(token_ids, dtype=torch.int64, device=device),
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            prompt_rows=sum(c.num_tokens for c in chunks if c.is_prompt),
        )

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Logits [len(chunks), V] (fp32) at each chunk's last token."""
        return self.model.forward(self.prepare(chunks), self.kv_cache)
