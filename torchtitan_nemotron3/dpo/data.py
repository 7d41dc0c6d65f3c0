"""Preference pairs as TorchTitan batches: ``dataloader = PreferenceDataLoader.Config(...)``.

Each pair is rendered twice by the SFT path's chat template (``sft.render``): the
prompt plus the chosen reply, the prompt plus the rejected reply; labels are the
reply's tokens only (the last assistant turn), ``-100`` elsewhere. The two
documents of a pair always share a row (one forward gives both log-probabilities),
several pairs per row, each document with positions restarting at 0 so Mamba state
and attention never cross documents (``sft.packing``'s rule). A row's tail is
padding.

Beside ``input``/``positions`` a row carries, per token, where its label's
log-probability goes:

* ``dpo_segment`` [L]: ``2k`` (chosen) or ``2k + 1`` (rejected) for the k-th pair
  of the row, on tokens whose label is a reply token; ``-1`` elsewhere;
* ``dpo_pair`` [L]: the pair's index in the dataset on the same tokens (the key of
  a precomputed reference log-probability), ``-1`` elsewhere.

``DPOTrainer`` takes both out before the model's forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.tools.logging import logger

from ..sft.chat_data import ChatDataError
from ..sft.dataloader import ChatSFTDataLoader, open_chat_data
from ..sft.packing import IGNORE_INDEX, Document, make_document
from ..sft.render import ChatTemplateConfig
from .pairs import PairColumns, to_pair

SEGMENT_KEY, PAIR_KEY = "dpo_segment", "dpo_pair"


@dataclass(slots=True)
class PairDocuments:
    index: int  # the pair's index in the dataset
    chosen: Document
    rejected: Document

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def pair_row(
    pairs: list[PairDocuments], seq_len: int, pad_id: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One row of ``seq_len`` from ``pairs`` (which must fit), padded at the end."""
    inputs, labels, positions, segment, pair = [], [], [], [], []
    for k, p in enumerate(pairs):
        for side, doc in enumerate((p.chosen, p.rejected)):
            inputs += doc.inputs
            labels += doc.labels
            positions += range(len(doc))
            scored = [label != IGNORE_INDEX for label in doc.labels]
            segment += [2 * k + side if s else -1 for s in scored]
            pair += [p.index if s else -1 for s in scored]
    room = seq_len - len(inputs)
    assert room >= 0, (len(inputs), seq_len)
    inputs += [pad_id] * room
    labels += [IGNORE_INDEX] * room
    positions += range(room)
    segment += [-1] * room
    pair += [-1] * room
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return {
        "input": as_long(inputs),
        "positions": as_long(positions),
        SEGMENT_KEY: as_long(segment),
        PAIR_KEY: as_long(pair),
    }, as_long(labels)


class PreferenceDataset(IterableDataset, Stateful):
    """One rank's pairs, rendered, masked and packed into rows, in data order."""

    def __init__(
        self,
        config: PreferenceDataLoader.Config,
        *,
        tokenizer: BaseTokenizer,
        seq_len: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
    ):
        _, self.encoder, self.source = open_chat_data(
            config,
            tokenizer,
            needs="preference data",
            assistant_turns="last",
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
        )
        self.pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
        self.config, self.seq_len, self.dp_rank = config, seq_len, dp_rank
        self.dropped = 0
        self._rows_read = 0  # source rows of this rank consumed in this epoch
        self._epoch = 0
        self._pending: list[PairDocuments] = []

    def encode(self, index: int, where: str, row: dict) -> PairDocuments | None:
        """The pair's two documents, or None when they cannot share a row."""
        pair = to_pair(row, self.config.columns, where)
        limit = self.seq_len if self.config.overflow == "drop" else self.seq_len // 2
        docs = []
        for side in (pair.chosen, pair.rejected):
            encoded = self.encoder.encode(side, where)
            doc, note = make_document(
                encoded.tokens, encoded.trained, limit, self.config.overflow
            )
            if doc is None and note != "longer than seq_len":
                raise ChatDataError(f"{where}: a reply has {note}")
            docs.append(doc)
        p = None if None in docs else PairDocuments(index, *docs)
        if p is None or len(p) > self.seq_len:
            if self.dropped == 0:
                logger.warning(
                    f"[dpo] {where}: chosen + rejected do not fit training.seq_len "
                    f"{self.seq_len}: dropped (dataloader.overflow = 'truncate' cuts "
                    "each to seq_len / 2); drops are counted"
                )
            self.dropped += 1
            return None
        return p

    def _rows(self, worker):
        """Rows from the pending pairs and the source, first fit in data order."""
        for index, where, row in self.source.indexed_rows(
            self._rows_read, self._epoch, worker
        ):
            self._rows_read += 1
            p = self.encode(index, where, row)
            if p is None:
                continue
            if sum(map(len, self._pending)) + len(p) <= self.seq_len:
                self._pending.append(p)
                continue
            # The state at the yield (rows read, pending) is where a resume starts.
            row = pair_row(self._pending, self.seq_len, self.pad_id)
            self._pending = [p]
            yield row

    def __iter__(self):
        info = get_worker_info()
        worker = (info.id, info.num_workers) if info is not None else (0, 1)
        while True:
            first_pass = self._rows_read == 0
            yield from self._rows(worker)
            if first_pass and self._rows_read == self.dropped:
                raise ChatDataError(
                    f"{self.config.dataset_path}: rank {self.dp_rank} has no pair that "
                    f"fits training.seq_len {self.seq_len} ({self.dropped} dropped)"
                )
            if not self.config.infinite:
                if self._pending:
                    row = pair_row(self._pending, self.seq_len, self.pad_id)
                    self._pending = []
                    yield row
                return
            self._epoch += 1
            self._rows_read = 0
            logger.info(f"[dpo] rank {self.dp_rank}: epoch {self._epoch} begins")

    def state_dict(self) -> dict[str, Any]:
        return {
            "rows_read": self._rows_read,
            "epoch": self._epoch,
            "pending": [
                (p.index, p.chosen.inputs, p.chosen.labels, p.rejected.inputs, p.rejected.labels)
                for p in self._pending
            ],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rows_read = state_dict["rows_read"]
        self._epoch = state_dict["epoch"]
        self._pending = [
            PairDocuments(i, Document(list(ci), list(cl)), Document(list(ri), list(rl)))
            for i, ci, cl, ri, rl in state_dict["pending"]
        ]


class PreferenceDataLoader(ChatSFTDataLoader):
    """(prompt, chosen, rejected) pairs for DPO: both replies of a pair in one row
    (the SFT loader's construction, with its own dataset and Config)."""

    dataset_class = PreferenceDataset

    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        dataset: str = "preference"
        """A name for the logs (the data is ``dataset_path``)."""

        dataset_path: str | None = None
        """A .jsonl/.json/.parquet file, a directory of them (files named after
        ``split`` first), a glob, or a hub dataset id (streamed)."""

        dataset_name: str | None = None
        split: str = "train"
        streaming: bool = True
        shuffle_seed: int | None = 42
        """Local files: pairs shuffled with seed + epoch ("None": file order)."""

        infinite: bool = True
        columns: PairColumns = field(default_factory=PairColumns)
        template: ChatTemplateConfig = field(default_factory=ChatTemplateConfig)

        overflow: Literal["drop", "truncate"] = "drop"
        """A pair longer than seq_len: dropped (counted), or each side cut to
        seq_len / 2 tokens."""
