"""The trainer's few calls into this package (kept here so ``train/trainer.py``
changes by a few lines)."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist
from torch.distributed import distributed_c10d
from torchtitan.tools.logging import logger


def after_init(trainer) -> None:
    """TorchTitan's async-checkpoint group is created without a timeout (gloo's
    default: 30 minutes) and ``set_pg_timeouts`` does not cover it: give it the
    init timeout, the budget of a collective that waits for other ranks' writes."""
    pg = getattr(trainer.checkpointer, "pg", None)
    if pg is not None:
        timeout = timedelta(seconds=trainer.config.comm.init_timeout_seconds)
        distributed_c10d._set_pg_timeout(timeout, pg)


def run_is_complete(trainer) -> bool:
    """A run whose checkpoint folder already holds a step at or past
    ``training.steps`` is finished: say so and train nothing (a restart would
    otherwise load the model-only last step strictly and fail, again and again)."""
    checkpointer = trainer.checkpointer
    latest = getattr(checkpointer, "latest_step", lambda: -1)()
    steps = trainer.config.training.steps
    if latest < steps or trainer.config.checkpoint.load_step != -1:
        return False
    logger.info(
        f"Run already complete: {checkpointer.folder}/step-{latest} reaches "
        f"training.steps = {steps}; nothing to train."
    )
    if dist.is_initialized():
        dist.barrier()
    return True
