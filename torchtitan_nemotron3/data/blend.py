"""Blends in Megatron's ``--data-path`` form and Megatron's deterministic blend rule.

``"0.7 data/web_text_document 0.3 data/code_text_document"`` (weights need not sum
to 1: they are normalised) or a single source with no weight. Which source serves
global row ``i`` (0-based) is decided greedily, with no random draw: the source
that lags its target share the most, ``argmax_k(w_k·max(i, 1) − count_k)`` (ties:
the first listed), exactly Megatron's ``helpers.build_blending_indices``. Every
prefix of the row stream is then within one row of every weight, which a random
draw (TorchTitan's interleave) is not; the order is a pure function of the
weights, so any rank can compute it for any row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class BlendError(ValueError):
    """A blend string that cannot be read; the message names the offending token."""


@dataclass(frozen=True)
class BlendEntry:
    weight: float
    spec: str  # a Megatron prefix, or text files (a file, directory or glob)


def parse_blend(blend: str, *, key: str = "dataloader.blend") -> list[BlendEntry]:
    """``"w1 p1 w2 p2 ..."`` or ``"p1"`` → entries with normalised weights."""
    tokens = blend.split() if blend else []
    if not tokens:
        raise BlendError(
            f"{key}: empty; give a Megatron prefix or 'w1 prefix1 w2 prefix2 ...'"
        )
    if len(tokens) == 1:
        if _number(tokens[0]) is not None:
            raise BlendError(f"{key}={blend!r}: weight {tokens[0]} names no source")
        return [BlendEntry(1.0, tokens[0])]
    if len(tokens) % 2:
        raise BlendError(
            f"{key}={blend!r}: {len(tokens)} tokens; expected weight/source pairs "
            "('w1 prefix1 w2 prefix2 ...')"
        )
    entries = []
    for weight, spec in zip(tokens[0::2], tokens[1::2]):
        w = _number(weight)
        if w is None:
            raise BlendError(f"{key}: weight {weight!r} (before {spec}) is not a number")
        if not (math.isfinite(w) and w > 0):
            raise BlendError(f"{key}: weight {weight} of {spec} must be finite and > 0")
        if _number(spec) is not None:
            raise BlendError(f"{key}: {spec!r} after weight {weight} is a number, not a source")
        entries.append(BlendEntry(w, spec))
    specs = [e.spec for e in entries]
    dup = next((s for s in specs if specs.count(s) > 1), None)
    if dup is not None:
        raise BlendError(f"{key}: source {dup} listed twice")
    total = sum(e.weight for e in entries)
    return [BlendEntry(e.weight / total, e.spec) for e in entries]


def _number(token: str) -> float | None:
    try:
        return float(token)
    except ValueError:
        return None


class GreedyBlend:
    """Global row → (source, row within that source), Megatron's greedy rule.

    The rule is sequential, so rows are computed forward in chunks and the window
    in use is kept; asking for a row before the window recomputes from row 0
    (readers move forward, so that happens once per process at most)."""

    CHUNK = 1 << 16

    def __init__(self, weights: list[float]):
        self.weights = np.asarray(weights, dtype=np.float64)
        self.K = len(weights)
        self._reset()

    def _reset(self) -> None:
        self._next = 0  # first row not computed yet
        self._counts = np.zeros(self.K, dtype=np.int64)  # rows given before _next
        self._start = 0  # window [start, next)
        self._source = np.zeros(0, dtype=np.int16)
        self._index = np.zeros(0, dtype=np.int64)

    def _extend(self, upto: int) -> None:
        if upto < self._start:
            self._reset()
        while self._next <= upto:
            n = self.CHUNK
            source, index = np.empty(n, np.int16), np.empty(n, np.int64)
            w, counts = self.weights.tolist(), self._counts.tolist()
            K, first = self.K, self._next
            for j in range(n):
                i = max(first + j, 1)
                best, best_err = 0, w[0] * i - counts[0]
                for k in range(1, K):
                    err = w[k] * i - counts[k]
                    if err > best_err:
                        best, best_err = k, err
                source[j] = best
                index[j] = counts[best]
                counts[best] += 1
            # keep the previous chunk too, so a reader slightly behind still hits
            keep = max(0, len(self._source) - self.CHUNK)
            self._source = np.concatenate([self._source[keep:], source])
            self._index = np.concatenate([self._index[keep:], index])
            self._start += keep
            self._next += n
            self._counts = np.asarray(counts, dtype=np.int64)

    def locate(self, row: int) -> tuple[int, int]:
        """(source k, its row number) of global row ``row``."""
        if self.K == 1:
            return 0, row
        if not (self._start <= row < self._next):
            self._extend(row)
        j = row - self._start
        return int(self._source[j]), int(self._index[j])

    def counts(self, rows: int) -> np.ndarray:
        """Rows given to each source among global rows ``[0, rows)``."""
        if rows == 0:
            return np.zeros(self.K, dtype=np.int64)
        if self.K == 1:
            return np.array([rows], dtype=np.int64)
        self.locate(rows - 1)
        # counts at row r = index of each source's next row; walk back from the
        # window's end, which knows the counts exactly
        counts = self._counts.copy()
        tail = self._source[rows - self._start :]
        counts -= np.bincount(tail, minlength=self.K)
        return counts
