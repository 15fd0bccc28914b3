"""Small random Mistral checkpoints written by transformers (the oracle), and a driver that runs our
decoder over the paged cache the way an engine would."""

import os
import random

import torch
from transformers import MistralConfig as HFMistralConfig
from transformers import MistralForCausalLM

from mistral_grpc.model.decoder import BatchInput, MistralDecoder

SMALL = dict(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256, rms_norm_eps=1e-5)
V01 = dict(rope_theta=1e4, sliding_window=4096)
V02 = dict(rope_theta=1e6, sliding_window=None)


def random_hf_model(seed: int = 0, **overrides) -> MistralForCausalLM:
    """A float32 Mistral with weights scaled so that attention is sharp and logits spread out: a mistake in
    positions, masking or rounding then changes the logits visibly instead of hiding in near-uniform softmax."""
    config = HFMistralConfig(**{**SMALL, **V02, **overrides}, attn_implementation="eager")
    model = MistralForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
            else:
                std = 1.0 if "embed_tokens" in name else 1.5 * param.shape[1] ** -0.5
                param.copy_(std * torch.randn(param.shape, generator=generator))
    return model


def save_random_model(path: str | os.PathLike, seed: int = 0, **overrides) -> MistralForCausalLM:
    model = random_hf_model(seed, **overrides)
    model.save_pretrained(path)
    return model


@torch.no_grad()
def hf_logits(model: MistralForCausalLM, tokens: list[int]) -> torch.Tensor:
    """Logits [S, V] at every position of one sequence, computed from scratch (no cache)."""
    return model(torch.tensor([tokens])).logits[0].float()


class PagedRunner:
    """Feeds sequences to the decoder chunk by chunk, giving each one scattered cache blocks."""

    def __init__(self, decoder: MistralDecoder, block_size: int, num_blocks: int = 128, seed: int = 0) -> None:
        self.decoder = decoder
        self.block_size = block_size
        self.cache = decoder.allocate_kv_cache(num_blocks, block_size)
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.tokens: dict[str, list[int]] = {}
        self.blocks: dict[str, list[int]] = {}

    def step(self, new_tokens: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """One forward over every sequence's new tokens; returns each sequence's next-token logits."""
        token_ids, positions, slots, seq_lens, starts = [], [], [], [], [0]
        for seq, tokens in new_tokens.items():
            cached = self.tokens.setdefault(seq, [])
            blocks = self.blocks.setdefault(seq, [])
            while len(blocks) * self.block_size < len(cached) + len(tokens):
                blocks.append(self.free_blocks.pop())
            token_ids += tokens
            for pos in range(len(cached), len(cached) + len(tokens)):
                positions.append(pos)
                slots.append(blocks[pos // self.block_size] * self.block_size + pos % self.block_size)
            seq_lens.append(len(cached) + len(tokens))
            starts.append(len(token_ids))
            cached += tokens
        width = max(len(self.blocks[seq]) for seq in new_tokens)
        tables = [self.blocks[seq] + [0] * (width - len(self.blocks[seq])) for seq in new_tokens]
        device = self.decoder.device
        batch = BatchInput(
            token_ids=torch.tensor(token_ids, device=device), positions=torch.tensor(positions, device=device),
            slot_mapping=torch.tensor(slots, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device))
        return dict(zip(new_tokens, self.decoder.forward(batch, self.cache).cpu()))

    def greedy(self, seq: str, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
        """Prefills `prompt` alone, then decodes `steps` tokens; returns them and the logits before each."""
        logits = self.step({seq: prompt})[seq]
        generated, history = [], []
        for _ in range(steps):
            history.append(logits)
            generated.append(int(logits.argmax()))
            logits = self.step({seq: generated[-1:]})[seq]
        return generated, history
