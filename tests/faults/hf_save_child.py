"""One process that saves step 1 (full state) and then TorchTitan's HF last step 2
(``last_save_in_hf``) through the commit-safe manager, SIGKILLing itself at a
chosen phase of the HF save (``test_checkpoint_commit.py`` checks what is left).

    python -m tests.faults.hf_save_child BASE PHASE INDEXED [RANK WORLD KILL_RANK]

PHASE: ``sharded`` (after DCP's per-rank safetensors), ``index`` (right after the
consolidation wrote ``model.safetensors.index.json``: the folder then looks
complete to any reader of HF files), ``config`` (half a ``config.json`` written by
the before-commit hook), ``none`` (completes). INDEXED: ``1`` saves with a file
index (TorchTitan's per-rank consolidation), ``0`` without (the coordinator's).
With WORLD 2 the two ranks meet through a file store in BASE and only KILL_RANK
dies; ``consolidated`` kills it right after its share of the per-rank
consolidation (before rank 0 gathers the shares and writes the index).
"""

from __future__ import annotations

import os
import signal
import sys
from datetime import timedelta

import torch.distributed as dist
import torch.distributed.checkpoint._consolidate_hf_safetensors as consolidate
import torch.distributed.checkpoint.filesystem as dcp_fs

from tests.faults.test_checkpoint_commit import _hf_manager, _save


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _after(module, name):
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        _die()
        return out

    setattr(module, name, wrapped)


def main(base: str, phase: str, indexed: bool, rank: int, world: int, kill_rank: int) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{base}/store", rank=rank, world_size=world,
        timeout=timedelta(seconds=20),
    )  # fmt: skip
    mgr, model, ts = _hf_manager(base, indexed)
    _save(mgr, model, ts, 1)
    if rank != kill_rank:
        phase = "none"
    if phase == "consolidated":
        _after(consolidate, "_consolidate_safetensors_files")
    elif phase == "sharded":
        _after(dcp_fs, "_write_files_from_queue")
    elif phase == "index":
        _after(consolidate, "_write_overall_metadata_file")

    def hook(tmp):
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write('{"model_type": "nemotron_h"')
            if phase == "config":
                f.flush()
                _die()
            f.write("}")

    mgr.before_hf_commit = hook
    _save(mgr, model, ts, 2, last_step=True)
    mgr.close()
    dist.destroy_process_group()
    print("saved", flush=True)


if __name__ == "__main__":
    rank, world, kill_rank = (int(a) for a in (sys.argv[4:] or ["0", "1", "0"]))
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "1", rank, world, kill_rank)
