"""The trainer's few calls into this package (kept here so ``train/trainer.py``
changes by a few lines)."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist
from torch.distributed import distributed_c10d
from torchtitan.tools.logging import logger

from .rng import apply_pending as apply_pending_rng  # noqa: F401 (the trainer's hook)


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
    load_step = trainer.config.checkpoint.load_step
    if latest < steps or (
        load_step != -1 and not checkpointer.rewind_applied(load_step)
    ):
        return False
    logger.info(
        f"Run already complete: {checkpointer.folder}/step-{latest} reaches "
        f"training.steps = {steps}; nothing to train."
    )
    if dist.is_initialized():
        dist.barrier()
    return True


def name_timed_out_collective(error: BaseException) -> None:
    """On a collective timeout, log which collective this rank was waiting in, from
    the flight recorder (TorchTitan enables it; gloo's own message names only a
    send/recv): its name, process group, sequence number and timeout."""
    text = str(error)
    if "timed out" not in text.lower() and "timeout" not in text.lower():
        return
    try:
        import pickle

        import torch

        trace = pickle.loads(torch._C._distributed_c10d._dump_fr_trace())
        entries = [e for e in trace.get("entries", []) if not e.get("is_p2p")]
    except Exception:  # the recorder off or unavailable: nothing more to say
        return
    if not entries:
        return
    last = entries[-1]
    group = last.get("process_group", ("?", "?"))
    rank = dist.get_rank() if dist.is_initialized() else 0
    logger.error(
        f"rank {rank}: collective timed out: {last.get('profiling_name')} on "
        f"process group {group[1]} (id {group[0]}), collective #"
        f"{last.get('collective_seq_id')} of that group, timeout "
        f"{last.get('timeout_ms')} ms, input sizes {last.get('input_sizes')}; a "
        "rank that never reached it (hung, frozen or dead) is the cause"
    )
