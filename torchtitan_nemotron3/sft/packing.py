"""Several conversations per row, each a document of its own.

A conversation of tokens ``t`` becomes the document ``inputs = t[:-1]``, ``labels =
t[1:]`` (``-100`` where the target is not an assistant token), ``positions = 0, 1,
...``: the model starts a new document wherever positions restart at 0
(``model.seq_idx_from_positions``), so the Mamba2 state and attention never cross
from one conversation into the next, and no label asks one conversation to predict
the next one's first token. A row's tail is padding: a document of its own with
``-100`` labels.

Packing is best fit over a window of pending conversations: a row starts with the
oldest (no conversation waits for ever) and is filled with the longest ones that
still fit. With a window of 64 rows are ~95-99% tokens, where first-fit in arrival
order leaves a part-row of padding whenever the next conversation does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

IGNORE_INDEX = -100  # TorchTitan's (components.loss.IGNORE_INDEX)


@dataclass(slots=True)
class Document:
    inputs: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.inputs)


def make_document(
    tokens: list[int],
    trained: list[bool],
    seq_len: int,
    overflow: Literal["drop", "truncate"],
) -> tuple[Document | None, str]:
    """``(document, "")``, or ``(None, reason)`` when the conversation cannot be
    used; a truncated one is ``(document, "truncated")``."""
    note = ""
    if len(tokens) - 1 > seq_len:
        if overflow == "drop":
            return None, "longer than seq_len"
        tokens, trained, note = (
            tokens[: seq_len + 1],
            trained[: seq_len + 1],
            "truncated",
        )
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(tokens[1:], trained[1:])]
    if all(label == IGNORE_INDEX for label in labels):
        return None, "no assistant token within seq_len"
    return Document(tokens[:-1], labels), note


@dataclass
class PackStats:
    """What the packer did, for the log."""

    conversations: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    tokens: int = 0  # non-padding positions
    trained: int = 0  # labels that are not -100
    seq_len: int = 0

    def line(self) -> str:
        capacity = max(1, self.rows * self.seq_len)
        dropped = ", ".join(f"{n} {why}" for why, n in self.dropped.items()) or "none"
        return (
            f"{self.rows} rows of {self.seq_len}: packing efficiency "
            f"{100 * self.tokens / capacity:.1f}% (non-padding tokens), assistant "
            f"tokens {100 * self.trained / capacity:.1f}%; {self.conversations} "
            f"conversations, {self.conversations / max(1, self.rows):.2f} per row; "
            f"truncated {self.truncated}; dropped {dropped}"
        )


class Packer:
    """Documents in, rows ``(inputs, labels, positions)`` of ``seq_len`` out."""

    def __init__(
        self, seq_len: int, pad_id: int, *, packing: bool = True, window: int = 64
    ):
        if window < 1:
            raise ValueError(f"pack window must be >= 1, got {window}")
        self.seq_len, self.pad_id = seq_len, pad_id
        self.window = window if packing else 1
        self.packing = packing
        self.pool: list[Document] = []
        self.stats = PackStats(seq_len=seq_len)

    def add(self, document: Document) -> None:
        assert len(document) <= self.seq_len, (len(document), self.seq_len)
        self.pool.append(document)

    def ready(self) -> bool:
        return len(self.pool) >= self.window

    def pop_row(self) -> tuple[list[int], list[int], list[int]]:
        """The next row, taken out of the pool (which must not be empty)."""
        docs = [self.pool.pop(0)]
        room = self.seq_len - len(docs[0])
        while self.packing:
            fits = [i for i, d in enumerate(self.pool) if len(d) <= room]
            if not fits:
                break
            best = max(fits, key=lambda i: (len(self.pool[i]), -i))
            docs.append(self.pool.pop(best))
            room -= len(docs[-1])
        inputs, labels, positions = [], [], []
        for d in docs:
            inputs += d.inputs
            labels += d.labels
            positions += range(len(d))
        inputs += [self.pad_id] * room
        labels += [IGNORE_INDEX] * room
        positions += range(room)
        s = self.stats
        s.rows += 1
        s.conversations += len(docs)
        s.tokens += self.seq_len - room
        s.trained += sum(label != IGNORE_INDEX for label in labels)
        return inputs, labels, positions

    def state_dict(self) -> dict:
        return {"pool": [(d.inputs, d.labels) for d in self.pool]}

    def load_state_dict(self, state: dict) -> None:
        self.pool = [Document(list(i), list(l)) for i, l in state["pool"]]
