"""The trainer's few calls into this package (kept here so ``train/trainer.py``
changes by a few lines)."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist
from torch.distributed import distributed_c10d
from torchtitan.tools.logging import logger

from .preempt import Preemption
from .spike import KEY as SPIKE_KEY
from .spike import SpikeGuard
from .rng import apply_pending as apply_pending_rng  # noqa: F401 (the trainer's hook)


def bound_new_group_timeouts(comm) -> None:
    """Before the process group exists: groups created after the default one (the
    device meshes' dimensions, TorchTitan's async-checkpoint group) take torch's
    backend default timeout (gloo 30 min, NCCL 10 min), not ``init_process_group``'s,
    so a rank hung before a mesh group's creation, or in a collective of one before
    TorchTitan's ``set_pg_timeouts`` (after the first step), held the others that
    long. Make ``comm.init_timeout_seconds`` their default (torch reads these
    module defaults at each group's creation)."""
    timeout = timedelta(seconds=comm.init_timeout_seconds)
    distributed_c10d.default_pg_timeout = timeout
    if isinstance(distributed_c10d.default_pg_nccl_timeout, timedelta):
        distributed_c10d.default_pg_nccl_timeout = timeout


def group_timeouts() -> list[tuple[str, int, str, float | None]]:
    """``(name, size, backend, timeout seconds)`` of every process group of this
    process (None: a backend without one, e.g. the fake backend TorchTitan gives
    an absent mesh axis, which carries no collective)."""
    out = []
    for pg, name in distributed_c10d._world.pg_names.items():
        kind, seconds = "none", None
        for device in pg._device_types:
            backend = pg._get_backend(device)
            kind = type(backend).__name__
            options = getattr(backend, "options", None)
            if options is not None and hasattr(options, "_timeout"):
                seconds = options._timeout.total_seconds()
        out.append((name, pg.size(), kind, seconds))
    return out


def name_setup_timeout(error: BaseException, comm) -> None:
    """A timeout while the trainer is built (process-group init, a device-mesh
    group's creation, a setup collective): say what timed out, as a note of the
    exception (the launcher's root-cause report shows it) and in the log."""
    text = str(error).lower()
    if "timed out" not in text and "timeout" not in text:
        return
    if not dist.is_initialized():
        stage = "process-group init (init_process_group)"
    elif isinstance(error, dist.DistStoreError):  # a new group's rendezvous
        stage = "the creation of a process group (a device-mesh dimension's)"
    else:
        name_timed_out_collective(error)
        if getattr(error, "__notes__", None):
            return
        stage = "a setup collective"
    note = (
        f"{stage} timed out (comm.init_timeout_seconds = "
        f"{comm.init_timeout_seconds}): a rank that never got there (hung, frozen "
        "or dead) is the cause"
    )
    logger.error(note)
    error.add_note(note)


def after_init(trainer) -> None:
    """TorchTitan's async-checkpoint group is created without a timeout (torch's
    default, unless ``bound_new_group_timeouts`` ran) and ``set_pg_timeouts`` does
    not cover it: give it the init timeout, the budget of a collective that waits
    for other ranks' writes."""
    trainer.preemption = Preemption()
    trainer._spike_guard = None
    spike = trainer.config.spike
    if spike.enable:
        if trainer.parallel_dims.pp_enabled:
            raise ValueError("spike.enable: not supported with pipeline parallelism yet")
        trainer._spike_guard = SpikeGuard(spike)
        if trainer.checkpointer.enable:
            trainer.checkpointer.states[SPIKE_KEY] = trainer._spike_guard
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
    send/recv): its name, process group, sequence number and timeout; also added
    to the exception as a note."""
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
    text = (
        f"rank {rank}: collective timed out: {last.get('profiling_name')} on "
        f"process group {group[1]} (id {group[0]}), collective #"
        f"{last.get('collective_seq_id')} of that group, timeout "
        f"{last.get('timeout_ms')} ms, input sizes {last.get('input_sizes')}; a "
        "rank that never reached it (hung, frozen or dead) is the cause"
    )
    logger.error(text)
    error.add_note(text)  # the launcher's root-cause report shows it (failure.py)


def preempted(trainer) -> bool:
    """At the top of each train-loop iteration: whether the ranks agree to stop
    for a SIGTERM (then the step is saved: ``preempt.py``)."""
    preemption = getattr(trainer, "preemption", None)
    if preemption is None or trainer.step >= trainer.config.training.steps:
        return False
    if preemption.stopped_at is not None:
        return True
    if not preemption.agreed(trainer.device):
        return False
    preemption.stopping = True
    preemption.stop(trainer)
    return True


def loss_spike(trainer) -> bool:
    """Whether this step's global loss is a spike (``spike.py``); counts, logs,
    and stops a run that keeps spiking (``nonfinite.max_consecutive_skips``)."""
    loss = trainer._step_loss.detach().clone()
    if trainer.parallel_dims.dp_cp_enabled:
        dist.all_reduce(loss, group=trainer.parallel_dims.get_mesh("loss").get_group())
    guard = trainer._spike_guard
    limit = guard.threshold()
    if not guard.is_spike(float(loss)):
        return False
    trainer.consecutive_skips += 1
    most = trainer.config.nonfinite.max_consecutive_skips
    if most and trainer.consecutive_skips >= most:
        raise RuntimeError(
            f"loss spike at step {trainer.step} (loss {float(loss):.4f} > {limit:.4f}), "
            f"{trainer.consecutive_skips} skipped steps in a row "
            f"(nonfinite.max_consecutive_skips={most}): stopping."
        )
    logger.warning(
        f"Loss spike at step {trainer.step}: loss {float(loss):.4f} > mean + "
        f"{guard.config.sigmas:g}σ = {limit:.4f} over the last "
        f"{min(int(guard.count), guard.config.window)} steps: skipped the update. "
        f"Spikes skipped so far: {int(guard.skipped)}."
    )
    return True
