"""One source's rows: a seeded document shuffle per epoch, packed into rows of
``seq_len`` (input, label) pairs. Row ``q`` of a source is a pure function of
(documents, seed, epoch, seq_len, isolation), so any process can build any row.

``isolate_documents=True`` (TorchTitan 0.3.0's text-path semantics): each document
of n tokens gives its n−1 (token, next token) pairs; the pairs of the shuffled
documents are concatenated and cut into rows of ``seq_len``, so no label is a
token of another document. Positions restart at 0 where a document starts and at
the start of a row that continues one, which is what makes the model's attention,
Mamba state and conv restart per document.

``isolate_documents=False`` (Megatron's / NVIDIA's pretraining stream): the
shuffled documents (each ending with its EOS) are concatenated; row q is the
window of ``seq_len + 1`` tokens starting at ``q·seq_len``, inputs ``[:-1]``,
labels ``[1:]``, positions ``0 .. seq_len−1``.

An epoch's tail that fills no whole row (fewer than ``seq_len`` pairs) is not
served; the next epoch reshuffles, so other documents end up there.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict

import numpy as np


class TokenIdError(ValueError):
    """A token id outside the model's vocabulary; names the file and document."""


class SourceRows:
    def __init__(
        self,
        source,
        *,
        seq_len: int,
        seed: int,
        isolate_documents: bool = True,
        shuffle: bool = True,
        vocab_size: int | None = None,
    ):
        self.source, self.seq_len, self.isolate = source, seq_len, isolate_documents
        self.shuffle, self.vocab_size = shuffle, vocab_size
        # the seed of a source depends on its name, not on its place in the blend:
        # changing weights or adding a source leaves each source's order alone
        self._seed = [seed, zlib.crc32(str(getattr(source, "identity", "")).encode())]
        lengths = np.asarray(source.doc_lengths, dtype=np.int64)
        self._units = np.maximum(lengths - 1, 0) if isolate_documents else lengths
        total = int(self._units.sum())
        self.rows_per_epoch = total // seq_len if isolate_documents else max(total - 1, 0) // seq_len
        self.tokens_per_epoch = total
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, cumulative units at each document's end) of an epoch."""
        hit = self._epochs.get(epoch)
        if hit is None:
            n = len(self._units)
            if self.shuffle:
                order = np.random.default_rng([*self._seed, epoch]).permutation(n)
            else:
                order = np.arange(n)
            hit = (order, np.cumsum(self._units[order]))
            self._epochs[epoch] = hit
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return hit

    def row(self, q: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """(input, label, positions) int64 arrays of ``seq_len``, and the
        [(document, offset, length)] pieces (for tests and messages)."""
        epoch, r = divmod(q, self.rows_per_epoch)
        order, ends = self._epoch(epoch)
        L = self.seq_len
        start = r * L
        need = L if self.isolate else L + 1  # units (pairs, or tokens) to collect
        p = int(np.searchsorted(ends, start, side="right"))
        offset = start - (int(ends[p]) - int(self._units[order[p]]))
        pieces, parts, positions = [], [], []
        got = 0
        while got < need:
            doc = int(order[p])
            take = min(int(self._units[doc]) - offset, need - got)
            if take > 0:
                if self.isolate:  # take+1 tokens give take pairs
                    toks = self.source[doc][offset : offset + take + 1]
                else:
                    toks = self.source[doc][offset : offset + take]
                self._check(toks, doc)
                parts.append(toks)
                pieces.append((doc, offset, take))
                positions.append(np.arange(take, dtype=np.int64))
                got += take
            p, offset = p + 1, 0
        if self.isolate:
            inputs = np.concatenate([t[:-1] for t in parts]).astype(np.int64)
            labels = np.concatenate([t[1:] for t in parts]).astype(np.int64)
            pos = np.concatenate(positions)
        else:
            window = np.concatenate(parts).astype(np.int64)
            inputs, labels = window[:-1], window[1:]
            pos = np.arange(L, dtype=np.int64)
        return inputs, labels, pos, pieces

    def _check(self, toks: np.ndarray, doc: int) -> None:
        if self.vocab_size is None or not len(toks):
            return
        top = int(toks.max())
        if top >= self.vocab_size or int(toks.min()) < 0:
            bad = top if top >= self.vocab_size else int(toks.min())
            real = getattr(self.source, "document_id", lambda d: d)(doc)
            where = getattr(self.source, "data_file", None) or self.source.name
            raise TokenIdError(
                f"{where}: document {real} has token id {bad}, outside "
                f"the model's vocabulary [0, {self.vocab_size}) (wrong tokenizer?)"
            )
