"""mistral_grpc._C.StopMatcher: stop strings over streamed text, against a plain-Python reference."""

import random

import pytest
import torch  # noqa: F401  (the extension links against libtorch: load it first)

from mistral_grpc._C import StopMatcher


def reference_truncate(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the first stop string to be completed (the longest of those ending there)."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            return text[: end - max(map(len, ending))], True
    return text, False


def reference_held_back(text: str, stops: list[str]) -> str:
    """The longest tail of `text` that some stop string starts with."""
    for start in range(len(text) + 1):
        tail = text[start:]
        if any(s.startswith(tail) for s in stops):
            return tail
    return ""


def stream(stops: list[str], pieces: list[str]) -> tuple[list[str], StopMatcher]:
    matcher = StopMatcher(stops)
    return [matcher.push(piece) for piece in pieces], matcher


def test_without_stops_text_passes_straight_through() -> None:
    emitted, matcher = stream([], ["Hello", ", wor", "ld"])
    assert emitted == ["Hello", ", wor", "ld"]
    assert not matcher.stopped and matcher.flush() == ""


def test_a_stop_split_across_tokens() -> None:
    emitted, matcher = stream(["END"], ["hello E", "N", "D and more", "ignored"])
    assert emitted == ["hello ", "", "", ""]
    assert matcher.stopped and matcher.flush() == ""


def test_a_held_back_prefix_is_released_when_it_turns_out_not_to_be_a_stop() -> None:
    emitted, matcher = stream(["END"], ["hello E", "N", "ough"])
    assert emitted == ["hello ", "", "ENough"]
    assert not matcher.stopped


def test_flush_returns_the_held_back_tail_when_no_stop_matched() -> None:
    emitted, matcher = stream(["</answer>"], ["42 </ans"])
    assert emitted == ["42 "]
    assert matcher.flush() == "</ans"


def test_a_stop_at_the_very_first_token() -> None:
    emitted, matcher = stream(["###"], ["###", "text"])
    assert emitted == ["", ""] and matcher.stopped


@pytest.mark.parametrize("stops,text,expected", [
    (["abcd", "bc"], "xabcd", "xa"),  # the stop that ends first wins
    (["ab", "abc"], "xabc", "x"),
    (["bcd", "cd"], "abcde", "a"),  # of stops ending together, the longest (earliest start)
    (["aab"], "aaab", "a"),  # a failed partial match restarts inside itself
    (["abab"], "xabaabab", "xaba"),
    (["\n\n", "\n"], "line\n\nmore", "line"),
])
def test_overlapping_stops(stops: list[str], text: str, expected: str) -> None:
    for pieces in ([text], list(text)):  # whole, and one character per push
        emitted, matcher = stream(stops, pieces)
        assert "".join(emitted) == expected and matcher.stopped


@pytest.mark.parametrize("stops,pieces,expected", [
    (["é!"], ["caf", "é", "!"], ["caf", "", ""]),  # a stop starting with a 2-byte character
    (["→"], ["a⇒", "b→c"], ["a⇒", "b"]),  # shares its lead byte with ⇒ but is not a prefix of it
    (["🙂x"], ["🙂🙂", "x"], ["🙂", ""]),  # 4-byte characters
    (["x"], ["日本", "語x"], ["日本", "語"]),
    (["日本語"], ["日", "本", "人"], ["", "", "日本人"]),
])
def test_multibyte_utf8_around_a_stop(stops: list[str], pieces: list[str], expected: list[str]) -> None:
    emitted, _ = stream(stops, pieces)
    assert emitted == expected


def test_long_stop_strings() -> None:
    stop = "=" * 500 + "END"
    emitted, matcher = stream([stop], ["a", "=" * 300, "=" * 200, "EN", "D"])
    assert emitted == ["a", "", "", "", ""] and matcher.stopped


def test_empty_stop_strings_are_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        StopMatcher(["ok", ""])


def test_random_streams_match_the_reference() -> None:
    rng = random.Random(7)
    alphabet = "ab é🙂"  # tiny, so stops overlap, repeat and straddle pushes often
    for _ in range(400):
        stops = ["".join(rng.choices(alphabet, k=rng.randint(1, 6))) for _ in range(rng.randint(1, 16))]
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 40)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 8))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        matcher = StopMatcher(stops)
        received, emitted = "", ""
        for piece in pieces:
            received += piece
            emitted += matcher.push(piece)
            truncated, stopped = reference_truncate(received, stops)
            if stopped:
                assert matcher.stopped and emitted == truncated
                break
            # Nothing emitted too early, nothing held back longer than a stop could need.
            assert not matcher.stopped
            assert emitted + reference_held_back(received, stops) == received
        if not matcher.stopped:
            emitted += matcher.flush()
        assert (emitted, matcher.stopped) == reference_truncate(text, stops), (stops, pieces)
