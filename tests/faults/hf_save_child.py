"""One process that saves step 1 (full state) and then TorchTitan's HF last step 2
(``last_save_in_hf``) through the commit-safe manager, SIGKILLing itself at a
chosen phase of the HF save (``test_checkpoint_commit.py`` checks what is left).

    python -m tests.faults.hf_save_child BASE PHASE INDEXED

PHASE: ``sharded`` (after DCP's per-rank safetensors), ``index`` (right after the
consolidation wrote ``model.safetensors.index.json``: the folder then looks
complete to any reader of HF files), ``config`` (half a ``config.json`` written by
the before-commit hook), ``none`` (completes). INDEXED: ``1`` saves with a file
index (TorchTitan's per-rank consolidation), ``0`` without (the coordinator's).
"""

from __future__ import annotations

import os
import signal
import sys

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


def main(base: str, phase: str, indexed: bool) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{base}/store", rank=0, world_size=1
    )
    mgr, model, ts = _hf_manager(base, indexed)
    _save(mgr, model, ts, 1)
    if phase == "sharded":
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
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "1")
