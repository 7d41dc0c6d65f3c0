"""Run mamba-ssm's Triton kernels on CPU tensors through Triton's interpreter.

With ``TRITON_INTERPRET=1`` in the environment *before* the kernel modules are imported
(``triton.jit`` decides at decoration time; simplest: before anything imports
triton), every ``@triton.jit`` kernel becomes an ``InterpretedFunction`` that runs
its program instances in Python/numpy on whatever tensors it gets, CPU ones
included. The math is the GPU kernels' own; only the host code around the
launches assumes a GPU in three places, which this module neutralises without
editing mamba-ssm:

1. ``@triton.autotune`` benchmarks every config through the GPU driver the first
   time a shape is seen. ``Autotuner.run`` skips benchmarking when it holds a single
   config, so each ``Autotuner`` in the kernel modules keeps only its first config
   (block sizes change the summation order, not what is computed).
2. The host code launches under ``torch.cuda.device(t.device.index)``; a CPU tensor's
   index is ``None``, which a CPU build of torch rejects. Inside those modules
   ``torch.cuda.device(None)`` is a null context.
3. Backward kernels size their grids by
   ``torch.cuda.get_device_properties(t.device).multi_processor_count``; for a CPU
   device the answer is ``CPU_MULTIPROCESSORS``.

(2) and (3) replace the name ``torch`` in the kernel modules' globals by a proxy
that forwards everything to ``torch`` except those two ``torch.cuda`` functions,
and those only for CPU arguments: ``torch`` itself is not patched, nothing outside
the prepared modules sees a difference.

All of it applies only when the interpreter is requested *and* CUDA is absent
(``active()``): on a GPU machine, or on CPU without ``TRITON_INTERPRET``, nothing
here runs and nothing is imported. It is the loader that calls ``prepare``, right
after importing the kernels, and then marks them as running on ``cpu`` too.
"""

import contextlib
import os
import sys
from types import ModuleType, SimpleNamespace

import torch

INTERPRET_ENV = "TRITON_INTERPRET"
# What a CPU "device" reports as its multiprocessor count (backward grid sizing).
CPU_MULTIPROCESSORS = 4
# Set on a module ``prepare`` has handled.
PREPARED_ATTR = "__nemotron3_interpreted__"
_TRUE = ("1", "true", "on", "y", "yes")  # as triton 3.9's knobs read it, any case


def requested() -> bool:
    """``TRITON_INTERPRET`` is set to a true value (read without importing triton)."""
    return os.environ.get(INTERPRET_ENV, "").lower() in _TRUE


def active() -> bool:
    """The interpreter is requested and there is no CUDA: CPU tensors go to the kernels."""
    return requested() and not torch.cuda.is_available()


def _is_cpu(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cpu"
    return device == "cpu"


class _CudaOnCpu:
    """``torch.cuda`` as the kernel modules see it: CPU arguments get answers."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def device(device):
        if device is None or _is_cpu(device):
            return contextlib.nullcontext()
        return torch.cuda.device(device)

    @staticmethod
    def get_device_properties(device=None):
        if _is_cpu(device):
            return SimpleNamespace(
                name="cpu (Triton interpreter)", multi_processor_count=CPU_MULTIPROCESSORS
            )
        return torch.cuda.get_device_properties(device)


class _TorchOnCpu:
    """``torch`` as the kernel modules see it: everything but ``cuda`` is torch's own."""

    cuda = _CudaOnCpu()

    def __getattr__(self, name):
        return getattr(torch, name)


TORCH_ON_CPU = _TorchOnCpu()


def _kernel_chain(obj):
    """``obj`` and what it wraps, for a Triton kernel (Autotuner → Heuristics → ... →
    JITFunction/InterpretedFunction); empty for anything else."""
    from triton.runtime.jit import KernelInterface

    chain = []
    while isinstance(obj, KernelInterface):
        chain.append(obj)
        obj = getattr(obj, "fn", None)
    return chain


def prepare(prefix: str) -> str:
    """Make the imported kernel modules whose names start with ``prefix`` (e.g.
    ``"mamba_ssm.ops.triton."``) run on CPU tensors. Idempotent. Returns "" when they
    can, else why not (kernels that were compiled for the GPU because
    ``TRITON_INTERPRET`` was set too late)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    modules = [
        m
        for name, m in sorted(sys.modules.items())
        if name.startswith(prefix) and isinstance(m, ModuleType)
    ]
    compiled = []
    for module in modules:
        for name, value in list(vars(module).items()):
            chain = _kernel_chain(value)
            if chain and not isinstance(chain[-1], InterpretedFunction):
                compiled.append(f"{module.__name__}.{name}")
    if compiled:
        return (
            f"{INTERPRET_ENV} is set but {len(compiled)} kernels (e.g. {compiled[0]}) were "
            "compiled for the GPU: set it before triton and the kernels are imported"
        )
    for module in modules:
        if getattr(module, PREPARED_ATTR, False):
            continue
        for value in list(vars(module).values()):
            for kernel in _kernel_chain(value):
                if isinstance(kernel, Autotuner) and len(kernel.configs) > 1:
                    kernel.configs = kernel.configs[:1]
        if vars(module).get("torch") is torch:
            module.torch = TORCH_ON_CPU
        setattr(module, PREPARED_ATTR, True)
    return ""
