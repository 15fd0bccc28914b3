"""decode against mistral-common's decode; streamed pieces concatenate to it and come out early."""

from __future__ import annotations

import random

import pytest
from tokenizer_cases import FRAGMENTS, random_text


def byte_id(tokenizer, value: int) -> int:
    return tokenizer._vocab.token_id(f"<0x{value:02X}>")


def stream(tokenizer, ids: list[int]) -> list[str]:
    detokenizer = tokenizer.detokenizer()
    return [detokenizer.push(i) for i in ids] + [detokenizer.flush()]


def id_sequences(tokenizer, seed: int) -> list[list[int]]:
    """Encoded texts, uniform random ids (control, unk, user-defined included) and byte-piece soup."""
    rng = random.Random(seed)
    encoded = [tokenizer.encode(random_text(rng)) for _ in range(400)] + [tokenizer.encode(f) for f in FRAGMENTS]
    uniform = [[rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(0, 12))] for _ in range(400)]
    bytes_ = [byte_id(tokenizer, b) for b in range(256)]
    soup = [
        [rng.choice(bytes_) if rng.random() < 0.7 else rng.randrange(tokenizer.vocab_size) for _ in range(10)]
        for _ in range(400)
    ]
    spliced = [[rng.choice([1, 2, 3, 5])] + ids + [2] for ids in encoded[:100]]  # control tokens around text
    return encoded + uniform + soup + spliced


def test_decode_matches_mistral_common(ours, reference, version) -> None:
    for ids in id_sequences(ours[version], seed=20):
        assert ours[version].decode(ids) == reference[version].decode(ids), ids


def test_streamed_pieces_concatenate_to_decode(ours, version) -> None:
    for ids in id_sequences(ours[version], seed=21):
        assert "".join(stream(ours[version], ids)) == ours[version].decode(ids), ids


def test_text_is_released_as_soon_as_it_is_whole(ours, version) -> None:
    """After each token, everything decodable so far is out (only an unfinished character waits)."""
    tokenizer = ours[version]
    rng = random.Random(22)
    texts = ["😀 emoji 👨‍👩‍👧 東京タワー 🇫🇷", "Ελληνικά 中文 한국어"] + [random_text(rng) for _ in range(100)]
    for text in texts:
        ids = tokenizer.encode(text)
        detokenizer = tokenizer.detokenizer()
        released = ""
        for k, token_id in enumerate(ids, 1):
            released += detokenizer.push(token_id)
            assert released == tokenizer.decode(ids[:k]).rstrip("\ufffd")
        assert released + detokenizer.flush() == tokenizer.decode(ids) == text.replace("\u2581", " ")


def test_emoji_from_byte_pieces(ours, version) -> None:
    tokenizer = ours[version]
    emoji_bytes = "😀".encode()
    pieces = stream(tokenizer, [byte_id(tokenizer, b) for b in emoji_bytes])
    assert pieces == ["", "", "", "😀", ""]
    cut_short = stream(tokenizer, [byte_id(tokenizer, b) for b in emoji_bytes[:3]])
    assert cut_short == ["", "", "", "\ufffd" * 3]


def test_leading_space_of_the_first_generated_token(ours, reference, version) -> None:
    """The model's first token "▁Hello" decodes as mistral-common decodes generated ids: "Hello"."""
    tokenizer = ours[version]
    generated = tokenizer.encode("Hello! It's nice to meet you.") + [tokenizer.eos_id]
    assert tokenizer._vocab.surface(generated[0], at_start=False) == b" Hello"
    assert "".join(stream(tokenizer, generated)) == tokenizer.decode(generated) == reference[version].decode(generated)
    assert tokenizer.decode(generated) == "Hello! It's nice to meet you."


def test_token_bytes(ours, version) -> None:
    tokenizer = ours[version]
    assert tokenizer.token_bytes(tokenizer.encode("Hello")[0]) == b" Hello"
    assert tokenizer.token_bytes(tokenizer.encode("Hello")[0], at_start=True) == b"Hello"
    assert tokenizer.token_bytes(byte_id(tokenizer, 0xF0)) == b"\xf0"
    assert tokenizer.token_bytes(tokenizer.eos_id) == b""


def test_ids_outside_the_vocabulary_are_refused(ours, version) -> None:
    for bad in (-1, ours[version].vocab_size):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            ours[version].decode([bad])
        with pytest.raises(ValueError, match="outside the vocabulary"):
            ours[version].detokenizer().push(bad)
