"""Text <-> token ids for Mistral's SentencePiece BPE vocabularies, through HF `tokenizers`.

Encoding reproduces SentencePiece (what mistral-common runs) exactly, whatever pipeline the
tokenizer.json declares: the dummy prefix and space escaping are done here on the whole text (HF's
Metaspace skips the prefix when the text starts with a space, and a normalizer runs separately on
each side of an added token), and the pre-tokenizer only cuts where no SentencePiece merge can
cross. Control tokens are never matched in text (encode_special_tokens), so "[INST]" or "</s>"
typed by a user stay plain text, as SentencePiece encodes them.

Decoding is SentencePiece's too (surface bytes per piece, see `surface`), not HF's decoder, which
differs on invalid byte-fallback sequences.

The merges are the one thing taken on trust from a tokenizer.json, and HF's SentencePiece
conversions can rank the whitespace-run merges differently from SentencePiece (transformers 5's
does). A file holding one of the two Mistral 7B vocabularies is therefore read through the copy
shipped in mistral_grpc/data, converted by scripts/make_tokenizer_json.py and checked against
mistral-common.
"""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers

SPACE = "\u2581"  # SentencePiece's escaped space
UNKNOWN_SURFACE = b" \xe2\x81\x87 "  # " ⁇ ", SentencePiece's rendering of <unk>
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
SHIPPED = {32000: "mistral_tokenizer_v1.json", 32768: "mistral_tokenizer_v3.json"}  # by vocabulary size
SHIPPED_DIR = Path(__file__).parents[1] / "data"
# A run of escaped spaces with the word after it: no Mistral piece holds a space after another
# character, so no merge crosses these cuts, and the BPE word cache gets reusable words.
_WORDS = pre_tokenizers.Split(Regex(f"{SPACE}*[^{SPACE}]+|{SPACE}+"), behavior="isolated")


class Vocab:
    """One Mistral SentencePiece vocabulary: encode text, and the surface bytes of every token."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        model = tokenizer.model
        if not isinstance(model, models.BPE) or not model.byte_fallback:
            raise ValueError("expected a SentencePiece-style BPE tokenizer.json with byte fallback (Mistral 7B)")
        tokenizer.normalizer = None
        tokenizer.pre_tokenizer = _WORDS
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer
        self._ids = tokenizer.get_vocab(with_added_tokens=True)
        self.size = max(self._ids.values()) + 1
        added = tokenizer.get_added_tokens_decoder()
        unknown = model.unk_token or "<unk>"
        self.control_ids = {i for i, token in added.items() if token.special and token.content != unknown}
        # Surface bytes per id (None: control tokens, which render as nothing) and whether the
        # piece starts with an escaped space, which SentencePiece drops at the start of a text.
        self._surfaces: list[bytes | None] = [b""] * self.size
        self._leading_space = [False] * self.size
        for piece, i in self._ids.items():
            byte = _BYTE_PIECE.fullmatch(piece)
            if i in self.control_ids:
                self._surfaces[i] = None
            elif piece == unknown:
                self._surfaces[i] = UNKNOWN_SURFACE
            elif byte and i not in added:
                self._surfaces[i] = bytes([int(byte.group(1), 16)])
            else:
                self._surfaces[i] = piece.replace(SPACE, " ").encode("utf-8")
                self._leading_space[i] = piece.startswith(SPACE) and i not in added

    @classmethod
    def from_file(cls, path: str | Path) -> "Vocab":
        tokenizer = Tokenizer.from_file(str(path))
        pieces = tokenizer.get_vocab(with_added_tokens=True)
        shipped_path = SHIPPED_DIR / SHIPPED.get(len(pieces), "-")
        if shipped_path.is_file() and not shipped_path.samefile(path):
            shipped = Tokenizer.from_file(str(shipped_path))
            if shipped.get_vocab(with_added_tokens=True) == pieces:
                tokenizer = shipped
        return cls(tokenizer)

    def token_id(self, piece: str) -> int | None:
        return self._ids.get(piece)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Each text as SentencePiece encodes it (dummy prefix included; "" gives [])."""
        escaped = [SPACE + text.replace(" ", SPACE) for text in texts if text]
        encoded = iter(self._tokenizer.encode_batch_fast(escaped, add_special_tokens=False))
        return [next(encoded).ids if text else [] for text in texts]

    def surface(self, token_id: int, at_start: bool) -> bytes | None:
        """The bytes token_id adds to decoded text (None for a control token, which adds nothing).

        at_start: no non-control token came before it, so SentencePiece drops its leading space.
        """
        if not 0 <= token_id < self.size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.size})")
        surface = self._surfaces[token_id]
        if at_start and self._leading_space[token_id]:
            return surface[1:]
        return surface
