"""The commit-safe checkpoint manager in one process (no launcher): commit by
rename, checksums checked at load with fallback or stop, one-shot rewinds that
move later steps aside, timeline-only purges, leftovers of killed saves removed,
RNG state round trip. The killed multi-rank runs are in ``test_faults.py``."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.stateful import Stateful

from torchtitan_nemotron3.resilience import rng
from torchtitan_nemotron3.resilience.checkpoint import ResilientCheckpointManager
from torchtitan_nemotron3.resilience.manifest import CheckpointCorruptError


@pytest.fixture(scope="module", autouse=True)
def one_rank_group(tmp_path_factory):
    """A one-rank gloo group: the manager's purge and checks are collective."""
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class _State(Stateful):
    def __init__(self):
        self.value = torch.zeros(4)

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, sd):
        self.value = sd["value"].clone()


def _manager(tmp_path, **config):
    model = nn.Linear(8, 8, bias=False)
    extra = {"train_state": _State()}
    cfg = ResilientCheckpointManager.Config(
        enable=True, interval=1, last_save_model_only=False, **config
    )
    mgr = cfg.build(
        dataloader=_State(), model_parts=[model], optimizers=_State(),
        lr_schedulers=_State(), states=extra, sd_adapter=None,
        base_folder=str(tmp_path),
    )  # fmt: skip
    return mgr, model, extra["train_state"]


def _save(mgr, model, train_state, step):
    with torch.no_grad():
        model.weight.fill_(float(step))
    train_state.value.fill_(float(step))
    mgr.save(step)


def _folder(mgr):
    return sorted(n for n in os.listdir(mgr.folder))


def test_save_commits_by_rename_with_a_manifest(tmp_path):
    mgr, model, ts = _manager(tmp_path, keep_latest_k=0)
    _save(mgr, model, ts, 1)
    assert _folder(mgr) == ["step-1"]
    manifest = json.loads(open(os.path.join(mgr.folder, "step-1", "manifest.json")).read())
    assert ".metadata" in manifest["files"] and "__0_0.distcp" in manifest["files"]
    assert {"rng", "train_state", "weight"} <= set(manifest["states"])
    mgr.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_newest_step_falls_back_naming_step_and_file(tmp_path, damage, caplog):
    mgr, model, ts = _manager(tmp_path, keep_latest_k=0)
    for step in (1, 2):
        _save(mgr, model, ts, step)
    data = os.path.join(mgr.folder, "step-2", "__0_0.distcp")
    if damage == "flip":
        with open(data, "r+b") as f:
            f.seek(os.path.getsize(data) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x01]))
    elif damage == "truncate":
        os.truncate(data, os.path.getsize(data) - 3)
    else:
        os.remove(data)
    with torch.no_grad():
        model.weight.zero_()
    assert mgr.load()
    assert torch.equal(model.weight, torch.full((8, 8), 1.0))  # step 1
    assert ts.value[0] == 1
    assert "checkpoint step 2 is corrupt" in caplog.text and data in caplog.text
    aside = [n for n in _folder(mgr) if n.startswith("corrupt-")]
    assert len(aside) == 1 and os.listdir(os.path.join(mgr.folder, aside[0])) == ["step-2"]
    mgr.close()


def test_corrupt_step_stops_when_asked(tmp_path):
    mgr, model, ts = _manager(tmp_path, keep_latest_k=0, on_corrupt="stop")
    _save(mgr, model, ts, 1)
    data = os.path.join(mgr.folder, "step-1", "__0_0.distcp")
    os.truncate(data, 10)
    with pytest.raises(CheckpointCorruptError, match=r"step 1 is corrupt: .*__0_0\.distcp: 10 bytes"):
        mgr.load()
    mgr.close()


def test_rewind_moves_later_steps_aside_once_and_purge_keeps_the_new_timeline(tmp_path):
    mgr, model, ts = _manager(tmp_path, keep_latest_k=2)
    for step in (1, 2, 3):
        _save(mgr, model, ts, step)
    mgr.close()
    assert _folder(mgr)[-2:] == ["step-2", "step-3"]  # step 1 purged
    mgr, model, ts = _manager(tmp_path, keep_latest_k=2)
    assert mgr.load(step=2)
    assert torch.equal(model.weight, torch.full((8, 8), 2.0))
    aside = [n for n in _folder(mgr) if n.startswith("rewound-to-2")]
    assert len(aside) == 1 and os.listdir(os.path.join(mgr.folder, aside[0])) == ["step-3"]
    _save(mgr, model, ts, 3)  # the new timeline's 3
    _save(mgr, model, ts, 4)  # purges 2 (new timeline only)
    mgr.close()
    names = _folder(mgr)
    assert [n for n in names if n.startswith("step-")] == ["step-3", "step-4"], names
    # A restart with the same load_step resumes the new timeline's newest step.
    mgr, model, ts = _manager(tmp_path, keep_latest_k=2)
    assert mgr.rewind_applied(2)
    assert mgr.load(step=2)
    assert torch.equal(model.weight, torch.full((8, 8), 4.0))
    mgr.close()


def test_leftovers_of_killed_saves_are_removed_and_never_loaded(tmp_path):
    mgr, model, ts = _manager(tmp_path, keep_latest_k=0)
    _save(mgr, model, ts, 1)
    for name in (".tmp-step-2", ".trash-step-0-x"):
        os.makedirs(os.path.join(mgr.folder, name))
        open(os.path.join(mgr.folder, name, ".metadata"), "w").close()
    assert mgr.latest_step() == 1
    assert mgr.load()
    assert _folder(mgr) == ["step-1"]
    mgr.close()


def test_rng_state_round_trip(tmp_path):
    mgr, model, ts = _manager(tmp_path, keep_latest_k=0)
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    _save(mgr, model, ts, 1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(4), random.seed(4), np.random.seed(4)
    assert mgr.load()
    rng.apply_pending()  # the trainer's call at the first batch
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    mgr.close()
