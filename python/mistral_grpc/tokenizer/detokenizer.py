"""Token ids -> text exactly as SentencePiece (mistral-common) decodes them, in one go or streamed.

SentencePiece renders an invalid byte-fallback sequence as one U+FFFD per byte; Python's "replace"
uses one per maximal invalid run, hence the error handler below. Streaming feeds the same bytes
through Python's incremental UTF-8 decoder, which holds back only an incomplete character, so the
streamed pieces always concatenate to `decode` of the same ids.
"""

from __future__ import annotations

import codecs

from mistral_grpc.tokenizer.vocab import Vocab

_ERRORS = "mistral_grpc.replace_each_byte"


def _replace_each_byte(error: UnicodeError) -> tuple[str, int]:
    assert isinstance(error, UnicodeDecodeError)
    return "\ufffd" * (error.end - error.start), error.end


codecs.register_error(_ERRORS, _replace_each_byte)


def decode(vocab: Vocab, ids: list[int]) -> str:
    out = bytearray()
    at_start = True
    for token_id in ids:
        surface = vocab.surface(token_id, at_start)
        if surface is not None:
            out += surface
            at_start = False
    return out.decode("utf-8", _ERRORS)


class IncrementalDetokenizer:
    """Generated ids in, text out as soon as it is whole UTF-8; `flush` at the end of the stream."""

    def __init__(self, vocab: Vocab) -> None:
        self._vocab = vocab
        self._utf8 = codecs.getincrementaldecoder("utf-8")(_ERRORS)
        self._at_start = True

    @property
    def at_start(self) -> bool:
        """No text yet: the next token's leading space is dropped (SentencePiece's rule)."""
        return self._at_start

    def push(self, token_id: int) -> str:
        surface = self._vocab.surface(token_id, self._at_start)
        if surface is None:
            return ""
        self._at_start = False
        return self._utf8.decode(surface)

    def flush(self) -> str:
        """Text still held back (an unfinished byte sequence, rendered as U+FFFD per byte)."""
        return self._utf8.decode(b"", final=True)
