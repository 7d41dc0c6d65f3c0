"""A resume without this rank's data-loader state is refused, naming the
checkpoint, the rank and the remedy (``resilience/loader_state.py``), through the
real ``ResilientCheckpointManager.dcp_load`` and real DCP checkpoints; a global
loader state (``PretrainDataLoader``'s row counter) resumes at any data-parallel
size. TorchTitan's own loader, handed a state without its key, only warns and
restarts that rank's data (checked here too, as the reason for the refusal)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.utils.data import IterableDataset
from torchtitan.components.dataloader import ParallelAwareDataloader

from torchtitan_nemotron3.resilience.checkpoint import ResilientCheckpointManager
from torchtitan_nemotron3.resilience.loader_state import LoaderStateError

REPO = Path(__file__).resolve().parents[2]


class Stream(IterableDataset):
    """Rank r's rows: 1000·r, 1000·r + 1, ..."""

    def __init__(self, rank: int):
        self.rank = rank

    def __iter__(self):
        i = 0
        while True:
            yield torch.tensor([1000 * self.rank + i])
            i += 1


def per_rank_loader(rank: int, size: int) -> ParallelAwareDataloader:
    return ParallelAwareDataloader(Stream(rank), dp_rank=rank, dp_world_size=size, batch_size=1)


def save_per_rank(path: Path, ranks=(0, 1), size=2, steps=3) -> None:
    """What a data-parallel save of TorchTitan's per-rank loaders writes (each
    rank its ``dp_rank_<r>``, ``world_size`` once), each rank ``steps`` batches in."""
    state = {}
    for r in ranks:
        loader = per_rank_loader(r, size)
        it = iter(loader)
        for _ in range(steps):
            next(it)
        state.update(loader.state_dict())
    dcp.save({"dataloader": state, "x": torch.ones(2)}, checkpoint_id=str(path))


def load(path: Path, loader, **extra) -> None:
    manager = object.__new__(ResilientCheckpointManager)
    manager.states = {}
    manager.dcp_load({"dataloader": loader, "x": torch.zeros(2), **extra}, str(path), False, False)


def test_same_data_parallel_size_resumes_each_rank(tmp_path):
    save_per_rank(tmp_path / "ckpt")
    loader = per_rank_loader(1, 2)
    load(tmp_path / "ckpt", loader)
    assert int(next(iter(loader))) == 1003  # rank 1's fourth row, not its first


def test_torchtitan_alone_only_warns_and_restarts_the_data(tmp_path, caplog):
    loader = per_rank_loader(2, 3)
    with caplog.at_level(logging.WARNING):
        loader.load_state_dict({"dp_rank_0": b"", "world_size": 3})
    assert "DataLoader state is empty for dp rank 2" in caplog.text
    assert int(next(iter(loader))) == 2000  # from the beginning


@pytest.mark.parametrize("rank", [0, 2])
def test_larger_data_parallel_size_is_refused(tmp_path, rank):
    """Saved at data-parallel size 2, resumed at 3: rank 2 has no state (TorchTitan
    would restart its data), ranks 0 and 1 theirs but a split they cannot make."""
    save_per_rank(tmp_path / "ckpt")
    with pytest.raises(LoaderStateError) as e:
        load(tmp_path / "ckpt", per_rank_loader(rank, 3))
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'ckpt'}: rank 0 (data-parallel rank {rank} of 3)"), msg
    assert "saved at data-parallel size 2" in msg and "resume at data-parallel size 2" in msg
    assert 'checkpoint.exclude_from_loading = ["dataloader"]' in msg
    if rank == 2:
        assert "no data-loader state for this rank (dataloader.dp_rank_2)" in msg
        assert "data-parallel ranks [0, 1]" in msg
    assert "\n" not in msg


def test_smaller_data_parallel_size_is_refused(tmp_path):
    """TorchTitan: a bare ``assert`` (dp_degree is inconsistent)."""
    save_per_rank(tmp_path / "ckpt")
    with pytest.raises(LoaderStateError, match="saved at data-parallel size 2, and this run has 1"):
        load(tmp_path / "ckpt", per_rank_loader(0, 1))


def test_excluded_loader_state_is_not_checked(tmp_path):
    save_per_rank(tmp_path / "ckpt")
    manager = object.__new__(ResilientCheckpointManager)
    manager.states = {}
    x = torch.zeros(2)
    manager.dcp_load({"x": x}, str(tmp_path / "ckpt"), False, False)
    assert torch.equal(x, torch.ones(2))


def _pretrain_loader(prefix: str, rank: int, size: int):
    from torchtitan_nemotron3.data.pretrain import PretrainDataLoader

    cfg = PretrainDataLoader.Config(blend=prefix, vocab_size=65536)
    return PretrainDataLoader(cfg, dp_world_size=size, dp_rank=rank, tokenizer=None,
                              seq_len=16, local_batch_size=2)  # fmt: skip


@pytest.fixture
def corpus(tmp_path):
    sys.path.insert(0, str(REPO / "tests" / "data"))
    try:
        from data_helpers import random_docs
    finally:
        sys.path.pop(0)
    from torchtitan_nemotron3.data.indexed import IndexedDatasetWriter

    prefix = str(tmp_path / "corpus_text_document")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in random_docs(200, seed=3, vocab=200, max_len=40):
            w.add_document(d)
        w.commit()
    return prefix


def test_global_row_counter_resumes_at_another_size(tmp_path, corpus):
    """The pretraining loader's state is one global counter saved once: saved at
    data-parallel size 2 after 3 steps (12 rows), resumed at size 3 (rank 2), it
    continues at global row 12 (no row lost or repeated, the batch is wider)."""
    loaders = [_pretrain_loader(corpus, r, 2) for r in range(2)]
    its = [iter(lo) for lo in loaders]
    for _ in range(3):
        for it in its:
            next(it)
    dcp.save({"dataloader": loaders[0].state_dict()}, checkpoint_id=str(tmp_path / "ckpt"))
    later = _pretrain_loader(corpus, 2, 3)
    manager = object.__new__(ResilientCheckpointManager)
    manager.states = {}
    manager.dcp_load({"dataloader": later}, str(tmp_path / "ckpt"), False, False)
    assert later.consumed_rows == 12
    inputs, _ = next(iter(later))
    want = torch.stack([torch.from_numpy(later.rows.row(g)[0]) for g in (16, 17)])
    assert torch.equal(inputs["input"], want)  # rank 2's rows of global batch 12..17

    # A per-rank loader resuming from this global state: another loader wrote it.
    with pytest.raises(LoaderStateError, match="another data loader wrote it"):
        manager.dcp_load({"dataloader": per_rank_loader(0, 2)}, str(tmp_path / "ckpt"),
                         False, False)  # fmt: skip


@pytest.mark.integration
def test_every_rank_stops_when_one_cannot_resume(tmp_path):
    """2 gloo ranks; the checkpoint has data-parallel ranks 0 and 2 (size 2, as
    many as now) but not 1: rank 1 refuses, and rank 0, whose state is there,
    refuses too instead of waiting for rank 1 inside DCP's load."""
    save_per_rank(tmp_path / "ckpt", ranks=(0, 2))
    worker = Path(__file__).with_name("loader_state_worker.py")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(worker), str(r), str(tmp_path / "init"),
                          str(tmp_path / "ckpt")], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [3, 3], outs
    for out in outs:
        assert "LoaderStateError: " in out and "rank 1 (data-parallel rank 1 of 2)" in out, out
