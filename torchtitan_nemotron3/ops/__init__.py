"""The Mamba2 mixer's sequence ops: exact torch, and the GPU kernels, below the model.

As mamba-ssm keeps ``ops/`` under ``modules/``: the model imports this package and
nothing here imports the model.

* ``ssd.py``, ``conv.py``: the chunked SSD scan and the packed-aware causal conv in
  plain torch, exact; the CPU path and the reference for every kernel.
* ``torch_ops.py``: ``MambaOps``, the interface the mixer calls (``conv``, ``scan``,
  ``gated_norm``), and ``TorchMambaOps`` on the torch ops.
* ``loader.py``: finds mamba-ssm's Triton SSD and gated norm and causal-conv1d's CUDA
  conv without importing what is missing; ``fla_conv.py``: fla-core's Triton conv.
* ``ssd_kernel.py``, ``conv_kernel.py``, ``norm_kernel.py``, ``fla_conv.py``: those
  kernels as ``torch.library`` custom ops (so compiled blocks hold them);
  ``kernel_ops.py``: the ``cuda`` and ``auto`` backends on them.
* ``long_rows.py``: calls past the kernels' 32-bit offsets, cut into exact pieces.
* ``interpret.py``: ``TRITON_INTERPRET=1`` without CUDA runs those kernels on CPU.
"""

from .kernel_ops import AutoMambaOps, CudaMambaOps, auto_plan
from .torch_ops import MambaOps, TorchMambaOps

KERNEL_BACKENDS = ("auto", "torch", "cuda")


def mamba_ops(backend: str) -> MambaOps:
    """The ops for a mixer's ``kernel_backend``: "torch" (exact, any device), "cuda"
    (mamba-ssm's Triton SSD and gated norm, causal-conv1d's or fla-core's conv, or an
    error), "auto" (the kernels on CUDA where installed and the call fits them, torch
    otherwise)."""
    if backend == "torch":
        return TorchMambaOps()
    if backend == "cuda":
        return CudaMambaOps()
    if backend == "auto":
        return AutoMambaOps()
    raise ValueError(f"kernel_backend={backend!r}: choose one of {KERNEL_BACKENDS}")


__all__ = [
    "KERNEL_BACKENDS",
    "AutoMambaOps",
    "CudaMambaOps",
    "MambaOps",
    "TorchMambaOps",
    "auto_plan",
    "mamba_ops",
]
