"""Where chat rows come from: local JSONL/JSON/Parquet files, or hub datasets
streamed through ``datasets``, each row with its location (file and row) for error
messages.

Rows are numbered from 1 in each file (JSONL errors also give the line number).
Each data-parallel rank (and dataloader worker) reads every ``world``-th row of the
per-epoch shuffled row order, so ranks never share a conversation.
"""

from __future__ import annotations

import glob
import json
import os
import random
from collections.abc import Iterator
from typing import Any

from .chat_data import ChatDataError

_EXTENSIONS = (".jsonl", ".json", ".parquet")


def _local_files(path: str, split: str) -> list[str] | None:
    """The data files ``path`` names (a file, a directory or a glob), or None when
    ``path`` is not local (a hub id). In a directory, the files whose name starts
    with ``split``; without any, all files are the "train" split (and no other)."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, f) for f in os.listdir(path) if f.endswith(_EXTENSIONS)
        )
        named = [f for f in files if os.path.basename(f).startswith(split)]
        if not files:
            raise ChatDataError(
                f"{path}: no .jsonl, .json or .parquet files in this directory"
            )
        if not named and split != "train":
            raise ChatDataError(
                f"{path}: no file whose name starts with split {split!r} (files: "
                f"{', '.join(os.path.basename(f) for f in files)})"
            )
        return named or files
    if any(c in path for c in "*?["):
        files = sorted(glob.glob(path))
        if not files:
            raise ChatDataError(f"{path}: no file matches this pattern")
        return files
    if path.startswith((".", "/", "~")) or path.endswith(_EXTENSIONS):
        raise ChatDataError(f"{path}: no such file or directory")
    return None


class _JsonLines:
    """A JSONL file (or a .json array) read row by row: line offsets are indexed once,
    a row is parsed when read. Rows may have different keys (Arrow's JSON reader
    refuses that)."""

    def __init__(self, path: str):
        self.path = path
        self.rows: list | None = None
        if os.path.getsize(path) == 0:  # a truncated write: never skipped silently
            raise ChatDataError(f"{path}: empty file (0 bytes)")
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
        if head.startswith(b"["):  # one JSON array
            with open(path, "rb") as f:
                raw = f.read()
            try:
                self.rows = json.loads(raw.decode("utf-8"))
            except json.JSONDecodeError as e:
                raise ChatDataError(f"{path}: invalid JSON: {e}") from None
            except UnicodeDecodeError as e:
                raise ChatDataError(
                    f"{path}: not valid UTF-8 (byte {e.start}: {e.reason})"
                ) from None
            return
        self.offsets: list[tuple[int, int]] = []  # (byte offset, line number)
        with open(path, "rb") as f:
            offset = 0
            for number, line in enumerate(f, start=1):
                if line.strip():
                    self.offsets.append((offset, number))
                offset += len(line)

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.offsets)

    def __getitem__(self, i: int) -> tuple[str, Any]:
        if self.rows is not None:
            return f"{self.path}: row {i + 1}", self.rows[i]
        offset, number = self.offsets[i]
        with open(self.path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        where = f"{self.path}: row {i + 1} (line {number})"
        try:
            return where, json.loads(line.decode("utf-8"))
        except json.JSONDecodeError as e:
            raise ChatDataError(f"{where}: invalid JSON: {e}") from None
        except UnicodeDecodeError as e:
            raise ChatDataError(f"{where}: not valid UTF-8 (byte {e.start}: {e.reason})") from None


class _Parquet:
    """A Parquet file, memory-mapped by Arrow, one row converted at a time; only the
    ``columns`` the conversation needs are read when the file has them all (else
    every column, so that an error can name what the rows have)."""

    def __init__(self, path: str, columns: list[str] | None = None):
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
            wanted = columns if columns and set(columns) <= set(names) else None
            self.table = pq.read_table(path, columns=wanted, memory_map=True)
        except Exception as e:  # noqa: BLE001 (Arrow raises several kinds)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ChatDataError(f"{path}: cannot read as Parquet: {first}") from None
        self.path = path

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> tuple[str, Any]:
        return f"{self.path}: row {i + 1}", self.table.slice(i, 1).to_pylist()[0]


class ChatSource:
    """Rows of one chat dataset with their location, for one data-parallel rank.

    Local files are indexed whole (JSONL by line offsets, Parquet memory-mapped),
    shuffled per epoch with ``shuffle_seed`` (None: file order). A hub dataset is
    streamed through ``datasets`` in its own order. ``rows(start)`` resumes after
    ``start`` rows of this rank.
    """

    def __init__(
        self,
        path: str,
        *,
        name: str | None = None,
        split: str = "train",
        streaming: bool = True,
        shuffle_seed: int | None = 42,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        columns: list[str] | None = None,
    ):
        self.path, self.split, self.shuffle_seed = path, split, shuffle_seed
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        files = _local_files(path, split)
        self.files: list = []
        self.stream = None
        if files is not None:
            self.files = [
                _Parquet(f, columns) if f.endswith(".parquet") else _JsonLines(f)
                for f in files
            ]
            self.num_rows = sum(len(f) for f in self.files)
            if self.num_rows == 0:
                raise ChatDataError(f"{path}: no rows")
        else:
            import datasets

            try:
                self.stream = datasets.load_dataset(
                    path, name=name, split=split, streaming=streaming
                )
            except Exception as e:  # noqa: BLE001 (datasets raises many kinds)
                raise ChatDataError(
                    f"{path} (split {split!r}): cannot load this dataset: {e}"
                ) from None

    def _order(self, epoch: int, shard: int, shards: int) -> list[int]:
        order = list(range(self.num_rows))
        if self.shuffle_seed is not None:
            random.Random(self.shuffle_seed + epoch).shuffle(order)
        return order[shard::shards]

    def _locate(self, index: int) -> tuple[str, Any]:
        for f in self.files:
            if index < len(f):
                return f[index]
            index -= len(f)
        raise IndexError(index)

    def rows(
        self, start: int = 0, epoch: int = 0, worker: tuple[int, int] = (0, 1)
    ) -> Iterator[tuple[str, dict]]:
        """``(where, row)`` for this rank's rows after its first ``start``; with
        ``worker = (id, num_workers)`` (dataloader workers), that worker's share."""
        for _, where, row in self.indexed_rows(start, epoch, worker):
            yield where, row

    def indexed_rows(
        self, start: int = 0, epoch: int = 0, worker: tuple[int, int] = (0, 1)
    ) -> Iterator[tuple[int, str, dict]]:
        """``rows``, each with its index in the whole dataset (the same every epoch
        for local files; the stream position for a hub dataset)."""
        shard = self.dp_rank + self.dp_world_size * worker[0]
        shards = self.dp_world_size * worker[1]
        if self.stream is None:
            for index in self._order(epoch, shard, shards)[start:]:
                yield (index, *self._locate(index))
            return
        stream = self.stream
        if hasattr(stream, "set_epoch"):
            stream.set_epoch(epoch)
        skip = start * shards
        if skip:
            stream = stream.skip(skip)
        for i, row in enumerate(stream, start=skip):
            if i % shards == shard:
                yield i, f"{self.path} [{self.split}]: row {i + 1}", row
