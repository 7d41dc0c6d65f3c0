"""A DCP writer whose step folder appears only once the whole save is on disk.

DCP's ``FileSystemWriter`` truncates and rewrites the data files of an existing
folder in place and replaces ``.metadata`` only at the end, so a re-save killed
midway leaves a folder that still has ``.metadata`` and mixes old and new ranks'
data. ``CommitWriter`` writes into ``.tmp-step-N`` instead; each rank records its
files' sizes and checksums beside them; the coordinator's ``finish`` (which DCP runs
only after every rank's data is written, in sync and async saves alike) writes
``.metadata``, then ``manifest.json``, then renames the folder to ``step-N``: the
rename is the commit. A kill at any point before it leaves no ``step-N``; the
leftover temporary folder is removed at the next load.

The checksums are computed from the bytes as DCP writes them (``SummingFileSystem``),
not by reading the files back: DCP only appends to a stream it opened with ``"wb"``
(``write``, ``tell``, ``flush``, ``fileno`` for the fsync). A stream used any other
way (a ``seek``, a ``truncate``, anything unknown), or a file whose size on disk is
not the bytes that went through, is read back instead, so the sum is always of the
file as it is on disk.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torchtitan.tools.logging import logger

from .layout import MANIFEST, fsync_dir, stamp, tmp_dir
from .manifest import ALGO, Summer, file_sum, write_manifest, write_rank_sums


def commit_step(tmp: str, final: str) -> None:
    """Rename the finished temporary folder to its step name (the commit). A
    folder already there (a save of the same step by an earlier attempt whose
    commit this one repeats) is moved aside, not merged. A folder without its
    manifest is never committed."""
    if not os.path.isfile(os.path.join(tmp, MANIFEST)):
        raise RuntimeError(f"{tmp}: no {MANIFEST}, not committing it as {final}")
    parent = os.path.dirname(final)
    if os.path.exists(final):
        aside = os.path.join(parent, f"replaced-{stamp()}")
        os.makedirs(aside, exist_ok=True)
        os.rename(final, os.path.join(aside, os.path.basename(final)))
    os.rename(tmp, final)
    fsync_dir(parent)


class _SummingStream:
    """A write stream that feeds every byte written to a ``Summer``. Only the
    calls DCP makes pass as sequential; anything else marks the sum unusable."""

    _SAFE = ("tell", "flush", "fileno", "close", "closed", "name", "mode",
             "writable", "seekable", "readable")  # fmt: skip

    def __init__(self, raw, algo: str):
        self._raw = raw
        self.summer = Summer(algo)
        self.sequential = True

    def write(self, buf) -> int:
        view = memoryview(buf)
        view = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
        n = self._raw.write(buf)
        if n is None or n != view.nbytes:  # a partial write: DCP would not retry
            self.sequential = False
        self.summer.update(view[: n or 0])
        return n

    def __getattr__(self, name):
        if name not in self._SAFE:
            self.sequential = False  # seek, truncate, writelines, ...: read back
        return getattr(self._raw, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._raw.close()


class SummingFileSystem(FileSystem):
    """DCP's local ``FileSystem`` that checksums each file it writes (``"wb"``) as
    the bytes go through, and follows renames (``.metadata.tmp`` → ``.metadata``)."""

    def __init__(self, algo: str = ALGO):
        super().__init__()
        self.algo = algo
        self.sums: dict[str, dict] = {}

    @contextmanager
    def create_stream(self, path, mode):
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        key = os.path.normpath(str(path))
        self.sums.pop(key, None)
        with super().create_stream(path, mode) as raw:
            stream = _SummingStream(raw, self.algo)
            yield stream
        # Reached only when the writer returned without an exception.
        if stream.sequential and os.path.getsize(key) == stream.summer.size:
            self.sums[key] = stream.summer.entry()
        else:
            logger.debug(f"{key}: not written sequentially, checksummed by reading it")

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        entry = self.sums.pop(os.path.normpath(str(path)), None)
        if entry is not None:
            self.sums[os.path.normpath(str(new_path))] = entry

    def take(self, path) -> dict:
        """The size and checksum of a file written through this file system (read
        back if its stream was not purely sequential, or its size changed since)."""
        key = os.path.normpath(str(path))
        entry = self.sums.pop(key, None)
        if entry is not None and os.path.getsize(key) == entry["size"]:
            return entry
        return file_sum(key, self.algo)


class CommitWriter(FileSystemWriter):
    """``FileSystemWriter`` into ``tmp_dir(final)``, committed by a rename.

    ``sum_in_write=False`` reads every file back after DCP wrote it (the slower
    way, kept for ``benchmarks/checkpoint_commit.py``)."""

    def __init__(
        self,
        final: str,
        *,
        step: int | None,
        states: list[str],
        algo: str = ALGO,
        sum_in_write: bool = True,
    ):
        super().__init__(tmp_dir(final))
        self.final = str(final)
        self.step = step
        self.states = states
        self.algo = algo
        self.fs = SummingFileSystem(algo)
        self.sum_in_write = sum_in_write

    def _sum(self, name: str) -> dict:
        path = os.path.join(str(self.path), name)
        if not self.sum_in_write:
            self.fs.sums.pop(os.path.normpath(path), None)
            return file_sum(path, self.algo)
        return self.fs.take(path)

    def write_data(self, plan, planner):
        fut = super().write_data(plan, planner)
        names = sorted({wr.storage_data.relative_path for wr in fut.wait()})
        write_rank_sums(
            str(self.path), plan.storage_data.prefix, {n: self._sum(n) for n in names}
        )
        return fut

    def finish(self, metadata, results) -> None:
        super().finish(metadata, results)
        write_manifest(
            str(self.path), self.step, self.states, metadata_sum=self._sum(".metadata")
        )
        commit_step(str(self.path), self.final)
