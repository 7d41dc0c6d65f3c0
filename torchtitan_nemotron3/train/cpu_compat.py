"""Run TorchTitan 0.3.0's ``Trainer`` on machines without CUDA (gloo, 1..N ranks).

TorchTitan 0.3.0 is written for accelerators; on a CPU-only torch build (CI, the
development machines here) its Trainer fails in several places before the first
step. Each shim below is feature-detected, applied only when its failure would
actually occur, and idempotent:

* :func:`apply` holds the process-level shims (call it before building the
  Trainer; it is cheap and safe to call more than once, also on GPU machines,
  where it only fills in ``torch.distributed.set_timeout`` if missing);
* :func:`adjust_config_for_cpu` changes ``Trainer.Config`` values instead of
  patching code wherever a config knob exists.

The docstring of each shim names the error it prevents.
"""

from __future__ import annotations

import functools
import os
import platform
import resource
import sys
import types
from datetime import timedelta

import torch
import torch.distributed as dist
from torchtitan.tools.logging import logger

# Process-level shims applied so far, by name (makes ``apply`` idempotent and lets
# tests and logs see what was needed).
_APPLIED: set[str] = set()


def _no_accelerator() -> bool:
    """True when TorchTitan would fall back to its "cuda" default device type."""
    from torch._utils import _get_available_device_type

    return not torch.cuda.is_available() and _get_available_device_type() is None


# --------------------------------------------------------------------------- shims


class _CpuDeviceModule(types.ModuleType):
    """``torch.cpu`` plus the few device-module functions TorchTitan calls on it.

    Without it, on CPU: ``torch.cpu`` has no ``get_device_name`` (AttributeError in
    ``DeviceMemoryMonitor.__init__``), nor ``get_device_properties``,
    ``reset_peak_memory_stats``, ``empty_cache``, ``memory_stats``; and
    ``torch.cpu.current_device()`` returns the string ``"cpu"``, so
    ``set_pg_timeouts``'s ``dist.barrier(device_ids=[current_device()])`` fails after
    the first step with ``TypeError`` (device ids must be ints). Memory statistics
    report the process's peak RSS, so the "memory" column of the logs stays
    meaningful.
    """

    def __init__(self) -> None:
        super().__init__("torchtitan_nemotron3_cpu_device_module")

    def __getattr__(self, name: str):
        return getattr(torch.cpu, name)

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def get_device_name(device=None) -> str:
        return platform.processor() or platform.machine() or "cpu"

    @staticmethod
    def get_device_properties(device=None) -> types.SimpleNamespace:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 1 << 40
        return types.SimpleNamespace(
            name=_CpuDeviceModule.get_device_name(), total_memory=total
        )

    @staticmethod
    def memory_stats(device=None) -> dict[str, int]:
        # ru_maxrss is KiB on Linux, bytes on macOS.
        scale = 1 if sys.platform == "darwin" else 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        return {
            "active_bytes.all.peak": peak,
            "reserved_bytes.all.peak": peak,
            "num_alloc_retries": 0,
            "num_ooms": 0,
        }

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass


def _shim_cpu_device() -> bool:
    """Make TorchTitan's device type "cpu" (and its device module CPU-capable).

    ``torchtitan.tools.utils`` computes ``device_type = _get_available_device_type()
    or "cuda"`` at import time, so without an accelerator every component targets
    CUDA: ``Trainer.__init__`` fails at ``device_module.set_device`` with
    ``AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'``.
    Modules that imported the two names already are rebound too; modules imported
    later read the patched ``tools.utils``.
    """
    if not _no_accelerator():
        return False
    from torchtitan.tools import utils

    cpu_module = _CpuDeviceModule()
    stale_types = {"cuda"}
    stale_modules = {torch.cuda, utils.device_module}
    utils.device_type, utils.device_module = "cpu", cpu_module
    for name, module in list(sys.modules.items()):
        if not name.startswith("torchtitan.") or module is None:
            continue
        if getattr(module, "device_type", None) in stale_types:
            module.device_type = "cpu"
        if any(getattr(module, "device_module", None) is m for m in stale_modules):
            module.device_module = cpu_module
    return True


def _shim_set_timeout() -> bool:
    """Provide ``torch.distributed.set_timeout`` where this torch lacks it.

    TorchTitan 0.3.0 was built against a torch nightly exposing
    ``dist.set_timeout(timeout, group)``; torch 2.13 (and older) only has the
    private ``distributed_c10d._set_pg_timeout`` with the same signature. Without
    it ``set_pg_timeouts`` (after the first step) raises ``AttributeError: module
    'torch.distributed' has no attribute 'set_timeout'``, on GPU and CPU alike.
    """
    if hasattr(dist, "set_timeout"):
        return False
    from torch.distributed import distributed_c10d

    private = getattr(distributed_c10d, "_set_pg_timeout", None)
    if private is None:
        return False

    @functools.wraps(private)
    def set_timeout(timeout: timedelta, group=None) -> None:
        private(timeout, group)

    dist.set_timeout = set_timeout
    return True


def _shim_flush_denormal() -> bool:
    """Flush float denormals to zero when training on an x86/Arm CPU.

    The SSD's decays are ``exp`` of sums that reach -100 and below within a chunk;
    their products land in the denormal range, where x86 arithmetic is ~100x
    slower. Seen here: Mamba2-heavy steps on CPU 10x slower and erratic. Values
    below 1e-38 carry no information for training; GPUs flush them too.
    """
    if not _no_accelerator():
        return False
    return torch.set_flush_denormal(True)


_SHIMS = {
    "cpu_device": _shim_cpu_device,
    "set_timeout": _shim_set_timeout,
    "flush_denormal": _shim_flush_denormal,
}


def apply() -> list[str]:
    """Apply the process-level shims this machine needs; return their names.

    Idempotent: a shim already applied is not re-applied, and a shim whose
    feature check says it is not needed is a no-op (so on a CUDA machine with a
    recent torch nothing changes).
    """
    for name, shim in _SHIMS.items():
        if name not in _APPLIED and shim():
            _APPLIED.add(name)
            logger.info(f"[cpu_compat] applied shim: {name}")
    return sorted(_APPLIED)


def applied() -> list[str]:
    """Names of the process-level shims applied so far in this process."""
    return sorted(_APPLIED)


# ------------------------------------------------------------ config adjustments


def adjust_config_for_cpu(config, world_size: int | None = None) -> list[str]:
    """Adjust a ``Trainer.Config`` in place for CPU/gloo; return what was changed.

    A no-op (returns ``[]``) when an accelerator is available. ``world_size``
    defaults to ``$WORLD_SIZE`` (set by torchrun), else 1. Idempotent.

    * ``training.disable_cuda_graphs = True``: CUDA graphs cannot capture on CPU
      (TorchTitan falls back to eager with a warning; this makes it explicit).
    * ``parallelism.spmd_backend = "partial_dtensor"`` when it is ``"spmd_types"``
      and ``world_size > 1``: the ``spmd_types`` path fails inside FSDP with 2 gloo
      ranks. (``full_dtensor`` is avoided: it logged about twice the expected loss.)
    """
    if not _no_accelerator():
        return []
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    changes = []
    if not config.training.disable_cuda_graphs:
        config.training.disable_cuda_graphs = True
        changes.append("training.disable_cuda_graphs=True")
    if world_size > 1:
        if config.parallelism.spmd_backend == "spmd_types":
            config.parallelism.spmd_backend = "partial_dtensor"
            changes.append("parallelism.spmd_backend='partial_dtensor'")
    for change in changes:
        logger.info(f"[cpu_compat] config: {change}")
    return changes
