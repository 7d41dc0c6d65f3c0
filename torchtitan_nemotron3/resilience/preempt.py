"""Preemption: SIGTERM (what Slurm and Kubernetes send before a kill) makes all
ranks stop at one step, save it, and exit 0.

torchrun forwards a SIGTERM it receives to its workers and SIGKILLs them 30 s
later; Slurm's ``--signal`` sends it to every process of the step. A rank's
handler only sets a flag; at the top of each loop iteration (after the previous
step and its regular save) the ranks all-reduce the flag (MAX, one scalar), so
they agree on the step even if the signal reached them at different times. Then
they save that step (unless it is already saved), rank 0 writes the step to
``$NEMOTRON_PREEMPT_MARKER`` (``run_train.sh`` reads it to exit 0), and training
ends; the next launch resumes from the saved step, losing none.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as dist
from torchtitan.components.checkpointer.dcp import AsyncMode
from torchtitan.tools.logging import logger

from .layout import is_committed

MARKER_ENV = "NEMOTRON_PREEMPT_MARKER"
GRACE_ENV = "NEMOTRON_PREEMPT_GRACE_S"


def _says_preempting(marker: str, wait_s: float = 1.0) -> bool:
    """Whether the launcher marked a preemption; waits up to ``wait_s`` for it
    (Slurm may signal the launcher and the ranks at the same moment)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(marker) as f:
                if f.read().strip() == "preempting":
                    return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


class Preemption:
    """The SIGTERM flag. Under ``run_train.sh`` a SIGTERM is a preemption only
    if the launcher wrote "preempting" to the marker first (torchrun also sends
    SIGTERM to the survivors of a failed rank: those die of it at once). A rank
    that does not reach the next step boundary within
    ``$NEMOTRON_PREEMPT_GRACE_S`` (default 20 s) of the signal is hung: it exits
    as killed by the signal, before torchrun's SIGKILL 30 s after it."""

    def __init__(self) -> None:
        self.requested = False
        self.stopping = False
        self.stopped_at: int | None = None
        self.grace_s = float(os.environ.get(GRACE_ENV, "20"))
        self._timer: threading.Timer | None = None
        try:
            signal.signal(signal.SIGTERM, self._on_signal)
        except ValueError:  # not the main thread (an in-process test): no handler
            pass

    def _on_signal(self, signum, frame) -> None:
        marker = os.environ.get(MARKER_ENV)
        if marker and not _says_preempting(marker):
            # run_train.sh writes "preempting" before it passes a SIGTERM on; any
            # other SIGTERM is torchrun stopping the survivors of a failed rank.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.requested = True
        if self._timer is None:
            self._timer = threading.Timer(self.grace_s, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        if self.stopping:
            return  # saving: torchrun's own grace decides
        logger.error(
            f"SIGTERM: no step boundary reached within {self.grace_s:g} s (a hung "
            "or failed peer?): exiting without a preemption save"
        )
        for handler in logger.handlers:
            handler.flush()
        os._exit(128 + signal.SIGTERM)  # as killed by the signal (from a thread)

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([int(self.requested)], dtype=torch.int32, device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def stop(self, trainer) -> None:
        """Save ``trainer.step`` (all ranks) and record it."""
        self.stopping = True
        step, ckpt = trainer.step, trainer.checkpointer
        if ckpt.enable and step > 0:
            ckpt.maybe_wait_for_saving()
            path = ckpt._create_checkpoint_id(step)
            if not is_committed(path):
                ckpt.dcp_save(
                    ckpt._flattened_model_states_sd(),
                    checkpoint_id=path,
                    async_mode=AsyncMode.DISABLED,
                )
        self.stopped_at = step
        rank = dist.get_rank() if dist.is_initialized() else 0
        marker = os.environ.get(MARKER_ENV)
        if rank == 0:
            logger.warning(
                f"Preempted (SIGTERM): all ranks stopped after step {step}"
                + (f", saved in {ckpt._create_checkpoint_id(step)}" if ckpt.enable else "")
                + "; launch the job again to resume."
            )
            if marker:
                with open(marker, "w") as f:
                    f.write(f"{step}\n")
