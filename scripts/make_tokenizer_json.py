"""Write the shipped tokenizer.json files from the SentencePiece models inside mistral-common.

    python scripts/make_tokenizer_json.py [--out python/mistral_grpc/data]

The server loads HF `tokenizers` JSON and must never import sentencepiece, so the two Mistral
SentencePiece models (v1: Mistral-7B-Instruct v0.1/v0.2, v3: v0.3) are converted once, here, and the
results are committed. The conversion is written out rather than taken from transformers because
transformers' converter orders BPE merges by piece id, while SentencePiece merges by piece score:
the whitespace-run pieces ("▁▁", "▁▁▁▁", ...) sit at low ids with score -1e9, so transformers' files
encode "x  y" differently from mistral-common. Mirroring SentencePiece exactly takes:

- merges ranked by the score of the piece they make (SentencePiece pops the best-scoring pair);
  all whitespace-run pieces share score -1e9, where SentencePiece takes the leftmost pair, which
  grows the leftmost run one "▁" at a time (runs of 16 from the left; there is no 15): ranking
  those merges by result length, then left length, both descending, does the same;
- the dummy prefix and space escaping as a normalizer (Prepend "▁" always, unlike Metaspace,
  which skips it when the text already starts with a space);
- a pre-tokenizer that cuts before each run of "▁" (no piece holds "▁" after another character,
  so no merge crosses such a cut) so the BPE word cache works;
- control pieces as special added tokens (the caller sets encode_special_tokens so user text never
  becomes a control token, as SentencePiece never matches control pieces in text) and
  user-defined pieces ([REFERENCE_DOC_n] in v3) as plain added tokens, matched in text as
  SentencePiece does. One gap remains in using the file on its own: HF normalizes the text on each
  side of such a token separately, so the text after one gets a second dummy prefix.
  mistral_grpc.tokenizer escapes the whole text itself and drops the normalizer, which closes it.

The script checks its output against SentencePiece on a corpus before writing.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import mistral_common
import sentencepiece
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

SPACE = "\u2581"
MODELS = {
    "mistral_tokenizer_v1.json": "tokenizer.model.v1",
    "mistral_tokenizer_v3.json": "mistral_instruct_tokenizer_240323.model.v3",
}
Piece = sentencepiece_model_pb2.ModelProto.SentencePiece


def bpe_merges(pieces: list[Piece]) -> list[tuple[str, str]]:
    normal = {p.piece: p.score for p in pieces if p.type == Piece.NORMAL}
    ranked: list[tuple[float, int, int, tuple[str, str]]] = []
    for piece, score in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                # Whitespace runs share one score: longer result first, then longer left part
                # (see the module docstring); other pieces have distinct scores.
                ranked.append((score, -len(piece), -len(left), (left, right)))
    ranked.sort(key=lambda item: (-item[0], item[1], item[2]))
    return [pair for *_, pair in ranked]


def read_model(model_path: Path) -> sentencepiece_model_pb2.ModelProto:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    return proto


def convert(model_path: Path) -> Tokenizer:
    proto = read_model(model_path)
    spec = proto.normalizer_spec
    assert proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    assert proto.trainer_spec.byte_fallback and spec.add_dummy_prefix and not spec.remove_extra_whitespaces
    assert spec.name == "identity", spec.name
    pieces = list(proto.pieces)
    normal = {p.piece for p in pieces if p.type == Piece.NORMAL}
    assert all(char in normal for piece in normal for char in piece), "a piece uses a character that is not a piece"
    assert not any(SPACE in piece.lstrip(SPACE) for piece in normal), "a piece holds a space after a character"

    vocab = {p.piece: i for i, p in enumerate(pieces)}
    unk = next(p.piece for p in pieces if p.type == Piece.UNKNOWN)
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=bpe_merges(pieces), unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(f"{SPACE}*[^{SPACE}]+|{SPACE}+"), behavior="isolated")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens(
        [
            AddedToken(p.piece, special=True, normalized=False)
            for p in pieces
            if p.type in (Piece.CONTROL, Piece.UNKNOWN)
        ]
    )
    tokenizer.add_tokens(
        [AddedToken(p.piece, special=False, normalized=False) for p in pieces if p.type == Piece.USER_DEFINED]
    )
    return tokenizer


def sample_texts(vocab: list[str], count: int, seed: int = 0) -> list[str]:
    """Random texts mixing `vocab` pieces, whitespace runs, control-token spellings and raw unicode."""
    rng = random.Random(seed)
    extras = [" ", "  ", "   ", "\n", "\t", "\r\n", "\u00a0", "\u3000", "\x00", SPACE, "</s>", "[INST]", "😀"]
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(0, 16)):
            roll = rng.random()
            if roll < 0.5:
                parts.append(rng.choice(vocab).replace(SPACE, " "))
            elif roll < 0.8:
                parts.append(rng.choice(extras))
            else:
                parts.append(chr(rng.choice([rng.randint(32, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])))
        texts.append("".join(parts))
    return texts


def check(tokenizer: Tokenizer, model_path: Path, count: int) -> int:
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    tokenizer.encode_special_tokens = True
    # User-defined pieces are left out: see the module docstring.
    vocab = [p.piece for p in read_model(model_path).pieces if p.type != Piece.USER_DEFINED]
    texts = sample_texts(vocab, count)
    theirs = processor.encode(texts)
    ours = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    bad = [t for t, a, b in zip(texts, theirs, ours) if a != b]
    for text in bad[:5]:
        print(f"  mismatch: {text!r}", file=sys.stderr)
    return len(bad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "python/mistral_grpc/data")
    parser.add_argument("--check", type=int, default=20000, help="random texts compared with SentencePiece")
    args = parser.parse_args()
    data = Path(mistral_common.__file__).parent / "data"
    args.out.mkdir(parents=True, exist_ok=True)
    for out_name, model_name in MODELS.items():
        tokenizer = convert(data / model_name)
        mismatches = check(tokenizer, data / model_name, args.check)
        if mismatches:
            sys.exit(f"{model_name}: {mismatches} of {args.check} texts encode differently; nothing written")
        tokenizer.save(str(args.out / out_name))
        print(f"{model_name} -> {args.out / out_name} ({tokenizer.get_vocab_size()} tokens, {args.check} texts match)")


if __name__ == "__main__":
    main()
