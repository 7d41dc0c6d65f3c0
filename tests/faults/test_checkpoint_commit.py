"""The commit-safe checkpoint manager in one process (no launcher): commit by
rename, checksums checked at load with fallback or stop, one-shot rewinds that
move later steps aside, timeline-only purges, leftovers of killed saves removed,
RNG state round trip. The killed multi-rank runs are in ``test_faults.py``."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import xxhash
from torch.distributed.checkpoint.stateful import Stateful

from torchtitan_nemotron3.resilience import commit, rng
from torchtitan_nemotron3.resilience.checkpoint import ResilientCheckpointManager
from torchtitan_nemotron3.resilience.manifest import (
    CheckpointCorruptError,
    check_files,
    file_sum,
    read_manifest,
)


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


def _save(mgr, model, train_state, step, last_step=False):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))
    train_state.value.fill_(float(step))
    mgr.save(step, last_step=last_step)


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


# --- checksums computed while DCP writes ---------------------------------------


@pytest.mark.parametrize("async_mode", ["disabled", "async"])
def test_sums_are_taken_while_writing_and_match_the_files(tmp_path, monkeypatch, async_mode):
    """No file is read back at save (sync and async), and every recorded entry is
    the size and XXH3 of the file on disk."""
    read_back = []
    real_file_sum = commit.file_sum
    monkeypatch.setattr(commit, "file_sum", lambda p, *a: read_back.append(p) or real_file_sum(p, *a))
    mgr, model, ts = _manager(tmp_path, keep_latest_k=0, async_mode=async_mode)
    _save(mgr, model, ts, 1)
    mgr.maybe_wait_for_saving()
    mgr.close()
    assert read_back == []
    step = os.path.join(mgr.folder, "step-1")
    manifest = read_manifest(step)
    assert manifest["format"] == 2 and {".metadata", "__0_0.distcp"} <= set(manifest["files"])
    for name, entry in manifest["files"].items():
        assert entry == file_sum(os.path.join(step, name)), name
        assert set(entry) == {"size", "xxh3_64"}


def test_a_stream_used_other_than_sequentially_is_read_back(tmp_path):
    """A write path that seeks back (or truncates) gets the sum of the file as it
    ends up on disk, not of the bytes that went through."""
    fs = commit.SummingFileSystem()
    edits = {
        # Same size as the bytes that went through, other content: only the
        # seek tells (a hole of 2, then the start overwritten).
        "seek": lambda s: (s.write(b"abc"), s.seek(5), s.write(b"d"), s.seek(0), s.write(b"xy")),
        "truncate": lambda s: (s.write(b"abcdef"), s.truncate(3)),
        "none": lambda s: (s.write(b"abcdef"), s.write(memoryview(np.arange(4, dtype=np.int32)))),
    }
    for edit, write in edits.items():
        path = tmp_path / edit
        with fs.create_stream(path, "wb") as stream:
            write(stream)
        assert fs.take(path) == file_sum(str(path)), edit
    assert file_sum(str(tmp_path / "seek")) == {
        "size": 6, "xxh3_64": xxhash.xxh3_64(b"xyc\0\0d").hexdigest()}
    assert file_sum(str(tmp_path / "none"))["size"] == 22
    # A file changed after its stream closed (size differs): read back too.
    path = tmp_path / "g"
    with fs.create_stream(path, "wb") as stream:
        stream.write(b"abc")
    with open(path, "ab") as f:
        f.write(b"d")
    assert fs.take(path) == file_sum(str(path))


def test_format_1_crc32_manifests_are_still_checked(tmp_path, caplog):
    """Steps saved before XXH3 (manifest format 1, CRC32 entries) load checked."""
    mgr, model, ts = _manager(tmp_path, keep_latest_k=0)
    for step in (1, 2):
        _save(mgr, model, ts, step)
    for step in (1, 2):
        folder = os.path.join(mgr.folder, f"step-{step}")
        manifest = read_manifest(folder)
        manifest["format"] = 1
        manifest["files"] = {}
        for name in sorted(os.listdir(folder)):
            if name != "manifest.json" and not name.endswith("sums.json"):
                with open(os.path.join(folder, name), "rb") as f:
                    data = f.read()
                manifest["files"][name] = {"size": len(data), "crc32": zlib.crc32(data)}
        with open(os.path.join(folder, "manifest.json"), "w") as f:
            json.dump(manifest, f)
    assert mgr.load()
    assert torch.equal(model.weight, torch.full((8, 8), 2.0))
    data = os.path.join(mgr.folder, "step-2", "__0_0.distcp")
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) - 1)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    with open(data, "rb") as f:
        bad = zlib.crc32(f.read())
    assert mgr.load()
    assert torch.equal(model.weight, torch.full((8, 8), 1.0))
    assert f"{data}: crc32 {bad:#010x}, the save wrote" in caplog.text
    mgr.close()


# --- never a committed step without its manifest -------------------------------


@pytest.mark.parametrize("fail_in", ["metadata", "manifest", "rename"])
def test_a_save_failing_before_the_commit_leaves_no_step(tmp_path, monkeypatch, fail_in):
    """CommitWriter.finish writes .metadata, then manifest.json, then renames: a
    failure at any of them leaves step 1 only, and the next load removes the rest."""
    mgr, model, ts = _manager(tmp_path, keep_latest_k=0)
    _save(mgr, model, ts, 1)

    def boom(*args, **kwargs):
        raise OSError(f"injected in {fail_in}")

    target = {"metadata": (dcp.FileSystemWriter, "finish"),
              "manifest": (commit, "write_manifest"),
              "rename": (commit.os, "rename")}[fail_in]  # fmt: skip
    monkeypatch.setattr(*target, boom)
    with pytest.raises(BaseException, match=f"injected in {fail_in}"):  # DCP wraps it
        _save(mgr, model, ts, 2)
    monkeypatch.undo()
    assert mgr.latest_step() == 1
    assert [n for n in _folder(mgr) if n.startswith("step-")] == ["step-1"]
    assert ".tmp-step-2" in _folder(mgr)
    assert mgr.load()
    assert _folder(mgr) == ["step-1"]
    mgr.close()


def test_commit_refuses_a_folder_without_manifest(tmp_path):
    tmp, final = tmp_path / ".tmp-step-3", tmp_path / "step-3"
    tmp.mkdir()
    (tmp / ".metadata").write_bytes(b"x")
    with pytest.raises(RuntimeError, match=r"\.tmp-step-3: no manifest\.json"):
        commit.commit_step(str(tmp), str(final))
    assert not final.exists()


# --- TorchTitan's HF last step (last_save_in_hf) through the commit ------------


class _HubNames:
    """A stand-in state dict adapter (what TorchTitan's HF save uses of one): hub
    names are ours under ``model.``; ``fqn_to_index_mapping`` puts the two layers
    in two files (TorchTitan's per-rank consolidation) or is None (one file,
    consolidated by the coordinator)."""

    def __init__(self, indexed: bool):
        self.fqn_to_index_mapping = (
            {"model.0.weight": 1, "model.0.bias": 1, "model.1.weight": 2} if indexed else None
        )

    def to_hf(self, sd):
        return {f"model.{k}": v for k, v in sd.items()}


def _hf_manager(base, indexed: bool):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4, bias=False))
    extra = {"train_state": _State()}
    cfg = ResilientCheckpointManager.Config(
        enable=True, interval=1, keep_latest_k=0, last_save_model_only=True,
        last_save_in_hf=True,
    )  # fmt: skip
    mgr = cfg.build(
        dataloader=_State(), model_parts=[model], optimizers=_State(),
        lr_schedulers=_State(), states=extra, sd_adapter=_HubNames(indexed),
        base_folder=str(base),
    )  # fmt: skip
    return mgr, model, extra["train_state"]


@pytest.mark.parametrize("indexed", [False, True], ids=["one_file", "indexed"])
def test_hf_last_step_appears_only_once_complete(tmp_path, indexed):
    """The HF step is written into .tmp-step-N; the hook (config.json) runs before
    any step-N exists; the commit brings the safetensors, the index, config.json
    and a manifest that checks, with the model's values."""
    from safetensors.torch import load_file

    mgr, model, ts = _hf_manager(tmp_path, indexed)
    _save(mgr, model, ts, 1)
    seen = {}

    def hook(tmp):
        seen["tmp"] = sorted(os.listdir(tmp))
        seen["steps"] = [n for n in _folder(mgr) if n.startswith("step-")]
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write("{}")

    mgr.before_hf_commit = hook
    _save(mgr, model, ts, 2, last_step=True)
    mgr.close()
    shards = (["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
              if indexed else ["model-00001-of-00001.safetensors"])  # fmt: skip
    assert seen["steps"] == ["step-1"]
    assert set(shards) | {"model.safetensors.index.json"} <= set(seen["tmp"])
    assert _folder(mgr) == ["step-1", "step-2"]
    step = os.path.join(mgr.folder, "step-2")
    manifest = read_manifest(step)
    assert set(shards) | {"config.json", "model.safetensors.index.json"} <= set(manifest["files"])
    assert any(n.startswith("sharded/") for n in manifest["files"])
    assert check_files(step, manifest["files"]) is None
    got = {}
    for shard in shards:
        got.update(load_file(os.path.join(step, shard)))
    want = {f"model.{k}": v for k, v in model.state_dict().items()}
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert mgr.latest_step() == 2


@pytest.mark.integration
@pytest.mark.parametrize(
    "phase, indexed",
    [
        ("index", True),
        pytest.param("index", False, marks=pytest.mark.matrix),
        pytest.param("sharded", True, marks=pytest.mark.matrix),
        pytest.param("config", True, marks=pytest.mark.matrix),
    ],
)
def test_sigkill_inside_the_hf_save_leaves_no_step(tmp_path, phase, indexed):
    """A process SIGKILLed inside its HF last save (after the per-rank files, right
    after the index that makes the folder look complete, inside config.json) leaves
    no step-2; the next load removes the leftover and loads step 1."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "tests.faults.hf_save_child", str(tmp_path), phase, str(int(indexed))],
        cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stdout + proc.stderr
    folder = tmp_path / "checkpoint"
    names = sorted(os.listdir(folder))
    assert names == [".tmp-step-2", "step-1"], names
    if phase == "index":  # what a reader of HF files would take as complete
        assert (folder / ".tmp-step-2" / "model.safetensors.index.json").is_file()
    mgr, model, _ = _hf_manager(tmp_path, indexed)
    assert mgr.latest_step() == 1
    assert mgr.load()
    assert all(torch.equal(p, torch.full_like(p, 1.0)) for p in model.parameters())
    assert sorted(os.listdir(folder)) == ["step-1"]
    mgr.close()


@pytest.mark.integration
@pytest.mark.matrix  # the default control is the two-rank save below
def test_the_hf_save_child_completes_without_a_kill(tmp_path):
    """The kill test's child, run to the end, commits step 2 (so the kills above
    are what leaves no step)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "tests.faults.hf_save_child", str(tmp_path), "none", "1"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and "saved" in proc.stdout, proc.stdout + proc.stderr
    step = tmp_path / "checkpoint" / "step-2"
    assert json.loads((step / "config.json").read_text()) == {"model_type": "nemotron_h"}
    assert check_files(str(step), read_manifest(str(step))["files"]) is None


def _two_ranks(tmp_path, phase, kill_rank):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")  # fmt: skip
    child = [sys.executable, "-m", "tests.faults.hf_save_child", str(tmp_path), phase, "1"]
    procs = [
        subprocess.Popen(
            [*child, str(rank), "2", str(kill_rank)], cwd=root, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    outs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        outs.append((proc.returncode, out))
    return outs


@pytest.mark.integration
def test_two_rank_hf_save_commits_both_ranks_files(tmp_path):
    """Two ranks, a two-file index: each rank consolidates one file (TorchTitan's
    per-rank consolidation), rank 0 the index; one commit brings both."""
    outs = _two_ranks(tmp_path, "none", -1)
    assert [rc for rc, _ in outs] == [0, 0], outs
    step = tmp_path / "checkpoint" / "step-2"
    files = read_manifest(str(step))["files"]
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json", "config.json"} <= set(files)  # fmt: skip
    assert check_files(str(step), files) is None
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["step-1", "step-2"]


@pytest.mark.integration
@pytest.mark.matrix
def test_rank_1_sigkilled_after_its_consolidation_leaves_no_step(tmp_path):
    """Rank 1 dies after writing its consolidated file; rank 0 fails in the
    gather: no step-2 (upstream would leave step-2 with rank 0's file only)."""
    outs = _two_ranks(tmp_path, "consolidated", 1)
    assert outs[1][0] == -9 and outs[0][0] != 0, outs
    folder = tmp_path / "checkpoint"
    assert sorted(os.listdir(folder)) == [".tmp-step-2", "step-1"]
    assert (folder / ".tmp-step-2" / "model-00001-of-00002.safetensors").is_file()
    mgr, model, _ = _hf_manager(tmp_path, True)
    assert mgr.latest_step() == 1
    assert mgr.load()
    assert all(torch.equal(p, torch.full_like(p, 1.0)) for p in model.parameters())
    mgr.close()
