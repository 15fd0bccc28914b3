"""Draft tokens for speculative decoding: a request's predicted output, else prompt lookup.

A sequence's drafts are verified in the step that decodes it: each draft is one more decode row of
the sequence, with its own attention entry, so every row's logits are what decoding one token at a
time gives (model_runner.py). The sampler draws at each row with the (seed, position) key that
one-at-a-time decoding uses, and a draft is accepted while the drawn token equals it (core.py). The
tokens, and their logprobs, are therefore those of a run without speculation, bit for bit; drafts
only decide how many of them one step produces.

Where drafts come from, per sequence (Drafter):
- the request's prediction (OpenAI's "Predicted Outputs"): followed from where the reply stands in it;
  when the reply departs from it, re-aligned to where the reply's last tokens pick it up again;
- else, with prompt lookup on, the last few tokens searched in the prompt and the reply so far: the
  most recent earlier occurrence of the longest such suffix proposes the tokens that followed it.

How many: each sequence drafts up to its own K, which grows while its drafts are accepted and falls
to what was accepted when one is not; after a few steps with nothing accepted it pauses drafting
for a while (doubling each time). A step verifies at most `max_rows` rows, decode rows included, so
a large batch, which is compute-bound already, drafts less or not at all.
"""

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

# Suffix lengths prompt lookup tries, longest first. One token matches too often by chance to be worth a row.
LOOKUP_NGRAMS = (4, 3, 2)
# A prediction is the caller's own guess: one token of the reply found in it is enough to re-align.
PREDICTION_NGRAMS = (4, 3, 2, 1)
MISSES_BEFORE_PAUSE = 3  # consecutive steps with nothing accepted
MAX_PAUSE_STEPS = 64


@dataclass(frozen=True)
class SpeculativeConfig:
    max_drafts: int  # K's cap per sequence and step; 0 = speculation off
    prompt_lookup: bool
    max_rows: int  # rows a step verifies at most, its decode rows included

    @property
    def enabled(self) -> bool:
        return self.max_drafts > 0


class NgramIndex:
    """Where the n-grams of a growing token list occur with at least one token after them: the most
    recent occurrence of each, and with `every` all of them (a prediction's, where re-alignment looks
    for the first one past a point; a prompt's and reply's hold only the latest, being long)."""

    def __init__(self, sizes: tuple[int, ...], every: bool = False) -> None:
        self.sizes = sizes
        self.tokens: list[int] = []
        # n-gram -> the position right after its latest occurrence (where its continuation starts)
        self._latest: dict[tuple[int, ...], int] = {}
        # n-gram -> the positions right after all its occurrences, ascending (when `every`)
        self._all: dict[tuple[int, ...], list[int]] | None = {} if every else None

    def extend(self, tokens: list[int]) -> None:
        start = len(self.tokens)
        self.tokens.extend(tokens)
        # The n-grams ending at `end` now have a continuation (tokens[end]) when end < len(tokens).
        for end in range(max(start, 1), len(self.tokens)):
            for n in self.sizes:
                if end >= n:
                    key = tuple(self.tokens[end - n:end])
                    self._latest[key] = end
                    if self._all is not None:
                        self._all.setdefault(key, []).append(end)

    def find(self, context: list[int], after: int | None = None) -> int | None:
        """Where the tokens following the longest indexed suffix of `context` start: with `after` (and
        `every`), the first such place at or past it if there is one; else the most recent."""
        for n in self.sizes:
            if len(context) < n:
                continue
            key = tuple(context[-n:])
            latest = self._latest.get(key)
            if latest is None:
                continue
            if after is not None and self._all is not None:
                ends = self._all[key]
                i = bisect.bisect_left(ends, after)
                if i < len(ends):
                    return ends[i]
            return latest
        return None


def prediction_index(prediction: Sequence[int]) -> NgramIndex:
    """A request's prediction, indexed for its choices' drafters to follow (read-only once built)."""
    index = NgramIndex(PREDICTION_NGRAMS, every=True)
    index.extend(list(prediction))
    return index


@dataclass
class Drafter:
    """One sequence's draft proposals and its adaptive K."""

    config: SpeculativeConfig
    prediction: NgramIndex | None  # the predicted reply (prediction_index), or None
    k: int = 0  # drafts to propose next, before the step's and the budget's limits
    _cursor: int | None = 0  # where the reply stands in the prediction; None: not aligned
    _anchor: int = 0  # the last aligned position, where re-alignment looks first
    _seen: int = 0  # reply tokens already followed through the prediction
    _lookup: NgramIndex | None = None
    _misses: int = 0
    _pause: int = 0  # steps left without drafting
    _next_pause: int = 1

    def __post_init__(self) -> None:
        self.k = self.config.max_drafts
        if self.prediction is None:
            self._cursor = None

    def propose(self, token_ids: list[int], prompt_len: int, limit: int) -> list[int]:
        """Up to min(K, limit) tokens expected to follow `token_ids` (prompt, then the reply so far)."""
        self._follow_prediction(token_ids[prompt_len:])
        if self._pause > 0:
            self._pause -= 1
            return []
        limit = min(limit, self.k)
        if limit <= 0:
            return []
        if self._cursor is not None:
            drafts = self.prediction.tokens[self._cursor:self._cursor + limit]
            if drafts:
                return drafts
        if self.config.prompt_lookup:
            return self._look_up(token_ids, limit)
        return []

    def record(self, drafted: int, accepted: int) -> None:
        """Adapts K to a verification's outcome: doubles it while all drafts are right, else takes
        what was accepted (at least 1); pauses after MISSES_BEFORE_PAUSE steps of nothing accepted."""
        if drafted == 0:
            return
        if accepted == drafted:
            self.k = min(self.config.max_drafts, 2 * self.k)
        else:
            self.k = max(1, accepted)
        self._misses = self._misses + 1 if accepted == 0 else 0
        if self._misses >= MISSES_BEFORE_PAUSE:
            self._pause, self._misses = self._next_pause, 0
            self._next_pause = min(MAX_PAUSE_STEPS, 2 * self._next_pause)
        elif accepted > 0:
            self._next_pause = 1

    def _follow_prediction(self, reply: list[int]) -> None:
        """Moves the cursor over the reply's new tokens while they match the prediction, else re-aligns."""
        if self.prediction is None or len(reply) == self._seen:
            return
        new = reply[self._seen:]
        self._seen = len(reply)
        if self._cursor is not None and self.prediction.tokens[self._cursor:self._cursor + len(new)] == new:
            self._cursor += len(new)
            self._anchor = self._cursor
        else:
            self._cursor = self.prediction.find(reply, after=self._anchor)
            if self._cursor is not None:
                self._anchor = self._cursor

    def _look_up(self, token_ids: list[int], limit: int) -> list[int]:
        if self._lookup is None:
            self._lookup = NgramIndex(LOOKUP_NGRAMS)
        self._lookup.extend(token_ids[len(self._lookup.tokens):])
        start = self._lookup.find(token_ids)
        return [] if start is None else token_ids[start:start + limit]


@dataclass
class DraftCounts:
    """Drafts of one request, over all its choices: accepted ones became reply tokens."""

    drafted: int = 0
    accepted: int = 0

    def add(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted

    @property
    def rejected(self) -> int:
        return self.drafted - self.accepted
