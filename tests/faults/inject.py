"""Test-only fault injection into the real trainer, without patching TorchTitan.

Imported by ``faults_config`` (``--module tests.faults.faults_config``) in every
rank process, it wraps a few functions of this package, DCP and TorchTitan
(monkeypatching at import, before the trainer exists) and, in the attempt and on
the rank that ``FAULT`` names, kills or stalls its own process at one phase:

``FAULT="<rank>:<step>:<phase>"``; ``FAULT_ATTEMPT`` (default 0; -1 every attempt)
is the torchrun attempt (``TORCHELASTIC_RESTART_COUNT``) that injects. Phases:

* ``mid_step``: SIGKILL after backward, before the optimizer update.
* ``write``: SIGKILL inside DCP's data write of the step's save (files written, the
  rank's write not returned).
* ``before_commit``: SIGKILL after the rank's data is written, before the commit
  (rank 0: at the coordinator's ``finish`` entry, before ``.metadata``).
* ``after_commit``: SIGKILL right after the commit (rank 0: after the rename;
  other ranks: when the save returns).
* ``purge``: SIGKILL inside the purge's deletion of step ``<step>`` (rank 0
  purges, in a thread), after deleting one of its files.
* ``sleep`` / ``stop``: sleep an hour / SIGSTOP itself before the update's
  all-reduce (a hung rank).
* ``init_sleep`` / ``setup_sleep`` (step 0): sleep an hour before the process
  group exists (TorchTitan's ``init_distributed``) / right after it and the
  before the device meshes and the rest of the setup (a rank hung at init).
* ``crash``: raise ``RuntimeError`` (a deterministic bug).
* ``term_launcher``: SIGTERM the torchrun agent (parent process) mid-step.

``FAULT_CYCLES=N``: instead, SIGKILL rank ``<rank>`` mid-step in each of the
first N attempts, at the second step the attempt trains (run it with
``checkpoint.interval`` 1 so each attempt commits one step before it dies).

Every rank also draws from torch's, Python's and NumPy's generators each step
and scales its gradients by the draw (``random_op``): a resume that does not
restore the RNG state diverges from the uninterrupted run.

``FAULT_LOG=<dir>``: every rank appends ``attempt step rank sha1`` of each batch it
trains (inputs and labels) to ``<dir>/batches-rank<r>.txt``, and ``attempt
setup|trained name size backend timeout_seconds`` of each of its process groups, once
built and once TorchTitan set the train timeout (after the first step), to
``<dir>/groups-rank<r>.txt``.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed.checkpoint.filesystem as dcp_fs
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools import filesystem as tt_fs

from torchtitan_nemotron3.resilience import checkpoint as rcheckpoint
from torchtitan_nemotron3.resilience import commit, hooks
from torchtitan_nemotron3.train.trainer import NemotronHTrainer

ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
RANK = int(os.environ.get("RANK", "0"))
_spec = os.environ.get("FAULT", "")
if _spec:
    _r, _s, PHASE = _spec.split(":")
    FAULT_RANK, FAULT_STEP = int(_r), int(_s)
else:
    FAULT_RANK, FAULT_STEP, PHASE = -1, -1, ""
_want_attempt = int(os.environ.get("FAULT_ATTEMPT", "0"))
CYCLES = int(os.environ.get("FAULT_CYCLES", "0"))
ACTIVE = bool(_spec) and RANK == FAULT_RANK and _want_attempt in (-1, ATTEMPT)
if CYCLES:
    ACTIVE = bool(_spec) and RANK == FAULT_RANK and ATTEMPT < CYCLES
LOG_DIR = os.environ.get("FAULT_LOG")

state = {"step": 0, "first": None}
# TorchTitan seeds torch only; seed Python's and NumPy's generators too (per rank,
# the same in every attempt) so the reference run is reproducible.
random.seed(1000 + RANK)
np.random.seed(2000 + RANK)


def _say(what: str) -> None:
    print(f"[inject] rank {RANK} attempt {ATTEMPT} step {state['step']}: {what}",
          file=sys.stderr, flush=True)  # fmt: skip


def fire(phase: str, step: int | None = None) -> None:
    """Inject ``phase`` if it is the one asked for, here and now."""
    step = state["step"] if step is None else step
    want = FAULT_STEP if not CYCLES else (state["first"] or 0) + 1
    if not (ACTIVE and phase == PHASE and step == want):
        return
    _say(phase)
    if LOG_DIR:
        with open(os.path.join(LOG_DIR, "fault-times.txt"), "a") as f:
            f.write(f"{ATTEMPT} {RANK} {step} {phase} {time.time()}\n")
    if phase in ("sleep", "init_sleep", "setup_sleep"):
        time.sleep(3600)
    elif phase == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif phase == "crash":
        raise RuntimeError(f"injected deterministic crash at step {step}")
    elif phase == "term_launcher":
        os.kill(os.getppid(), signal.SIGTERM)
    else:
        os.kill(os.getpid(), signal.SIGKILL)


# --- the train step: record batches, mid-step faults ---------------------------

_train_step = NemotronHTrainer.train_step
_post = NemotronHTrainer.post_dataloading_process
_check_update = NemotronHTrainer._check_update


def train_step(self, data_iterator):
    state["step"] = self.step
    if state["first"] is None:
        state["first"] = self.step
    return _train_step(self, data_iterator)


def post_dataloading_process(self, input_dict, labels):
    if LOG_DIR:
        h = hashlib.sha1()
        for key in sorted(input_dict):
            value = input_dict[key]
            if hasattr(value, "numpy"):
                h.update(key.encode())
                h.update(value.contiguous().numpy().tobytes())
        h.update(labels.contiguous().numpy().tobytes())
        with open(os.path.join(LOG_DIR, f"batches-rank{RANK}.txt"), "a") as f:
            f.write(f"{ATTEMPT} {self.step} {RANK} {h.hexdigest()}\n")
    return _post(self, input_dict, labels)


def random_op(self) -> None:
    """Scale this rank's gradients by a draw from each generator."""
    draw = torch.rand(()).item() + random.random() + float(np.random.rand())
    scale = 0.9 + 0.2 * draw / 3
    with torch.no_grad():
        for part in self.model_parts:
            for p in part.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)


def check_update(self, *args):
    random_op(self)
    for phase in ("mid_step", "sleep", "stop", "crash", "term_launcher"):
        fire(phase)
    return _check_update(self, *args)


# --- init: a rank hung before or right after the process group's creation ------

_init_distributed = dist_utils.init_distributed


def init_distributed(*args, **kwargs):
    fire("init_sleep", 0)
    out = _init_distributed(*args, **kwargs)
    fire("setup_sleep", 0)
    return out


dist_utils.init_distributed = init_distributed

# --- every process group's timeout, after the setup and after the first step ---

_trainer_init = NemotronHTrainer.__init__
_set_pg_timeouts = dist_utils.set_pg_timeouts


def _record_groups(when: str) -> None:
    if LOG_DIR:
        with open(os.path.join(LOG_DIR, f"groups-rank{RANK}.txt"), "a") as f:
            for name, size, backend, seconds in hooks.group_timeouts():
                f.write(f"{ATTEMPT} {when} {name} {size} {backend} {seconds}\n")


def trainer_init(self, config):
    _trainer_init(self, config)
    _record_groups("setup")


def set_pg_timeouts(*args, **kwargs):
    _set_pg_timeouts(*args, **kwargs)
    _record_groups("trained")


NemotronHTrainer.__init__ = trainer_init
dist_utils.set_pg_timeouts = set_pg_timeouts

NemotronHTrainer.train_step = train_step
NemotronHTrainer.post_dataloading_process = post_dataloading_process
NemotronHTrainer._check_update = check_update

# --- the save ------------------------------------------------------------------

_write_files = dcp_fs._write_files_from_queue
_write_data = commit.CommitWriter.write_data
_finish = commit.CommitWriter.finish
_commit_step = commit.commit_step
_dcp_save = rcheckpoint.ResilientCheckpointManager.dcp_save
_rmtree = tt_fs.rmtree


def write_files_from_queue(*args, **kwargs):
    out = _write_files(*args, **kwargs)
    fire("write", state.get("saving"))
    return out


def write_data(self, plan, planner):
    state["saving"] = self.step
    out = _write_data(self, plan, planner)
    if RANK != 0:
        fire("before_commit", self.step)
    return out


def finish(self, metadata, results):
    fire("before_commit", self.step)
    return _finish(self, metadata, results)


def commit_step(tmp, final):
    _commit_step(tmp, final)
    fire("after_commit", int(os.path.basename(final).split("-")[1]))


def dcp_save(self, state_dict, checkpoint_id, *args, **kwargs):
    out = _dcp_save(self, state_dict, checkpoint_id, *args, **kwargs)
    if RANK != 0:
        if hasattr(out, "result"):
            out.result()  # async: the commit is when the save finishes
        fire("after_commit", int(os.path.basename(checkpoint_id).split("-")[1]))
    return out


def rmtree(path):
    # Delete part of the folder, then die: a purge killed halfway. The step is
    # the purged one (``.trash-step-N-...``): the purge runs in a thread.
    name = os.path.basename(str(path))
    purged = int(name.split("-")[2]) if name.startswith(".trash-step-") else -1
    names = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if names and ACTIVE and PHASE == "purge" and purged == FAULT_STEP:
        os.remove(os.path.join(path, names[0]))
    fire("purge", purged)
    return _rmtree(path)


dcp_fs._write_files_from_queue = write_files_from_queue
commit.CommitWriter.write_data = write_data
commit.CommitWriter.finish = finish
commit.commit_step = commit_step
rcheckpoint.ResilientCheckpointManager.dcp_save = dcp_save
tt_fs.rmtree = rmtree
