"""A DCP writer whose step folder appears only once the whole save is on disk.

DCP's ``FileSystemWriter`` truncates and rewrites the data files of an existing
folder in place and replaces ``.metadata`` only at the end, so a re-save killed
midway leaves a folder that still has ``.metadata`` and mixes old and new ranks'
data. ``CommitWriter`` writes into ``.tmp-step-N`` instead; each rank records its
files' sizes and CRC32s beside them; the coordinator's ``finish`` (which DCP runs
only after every rank's data is written, in sync and async saves alike) writes
``.metadata``, then ``manifest.json``, then renames the folder to ``step-N``: the
rename is the commit. A kill at any point before it leaves no ``step-N``; the
leftover temporary folder is removed at the next load.
"""

from __future__ import annotations

import os

from torch.distributed.checkpoint import FileSystemWriter

from .layout import fsync_dir, stamp, tmp_dir
from .manifest import write_manifest, write_rank_sums


def commit_step(tmp: str, final: str) -> None:
    """Rename the finished temporary folder to its step name (the commit). A
    folder already there (a save of the same step by an earlier attempt whose
    commit this one repeats) is moved aside, not merged."""
    parent = os.path.dirname(final)
    if os.path.exists(final):
        aside = os.path.join(parent, f"replaced-{stamp()}")
        os.makedirs(aside, exist_ok=True)
        os.rename(final, os.path.join(aside, os.path.basename(final)))
    os.rename(tmp, final)
    fsync_dir(parent)


class CommitWriter(FileSystemWriter):
    """``FileSystemWriter`` into ``tmp_dir(final)``, committed by a rename."""

    def __init__(self, final: str, *, step: int | None, states: list[str]):
        super().__init__(tmp_dir(final))
        self.final = str(final)
        self.step = step
        self.states = states

    def write_data(self, plan, planner):
        fut = super().write_data(plan, planner)
        names = [wr.storage_data.relative_path for wr in fut.wait()]
        write_rank_sums(str(self.path), plan.storage_data.prefix, names)
        return fut

    def finish(self, metadata, results) -> None:
        super().finish(metadata, results)
        write_manifest(str(self.path), self.step, self.states)
        commit_step(str(self.path), self.final)
