"""GPU kernels for the Mamba2 mixer: mamba-ssm's Triton SSD and causal-conv1d's CUDA conv.

Importing this package imports no kernel package: it defines the custom ops
(``nemotron3::mamba_ssd``, ``nemotron3::causal_conv1d_silu`` and their backwards)
and registers two ``MambaOps`` backends, ``"cuda"`` (the kernels, or an error) and
``"auto"`` (the kernels where they apply, else torch; the default). The kernel
packages are imported on first use on a CUDA tensor, see ``loader.py``.
"""

from ..model.mamba_ops import register_mamba_ops
from .loader import (
    KernelStatus,
    KernelUnavailable,
    conv_kernels,
    override_kernels,
    ssd_kernels,
)
from .ops import AutoMambaOps, CudaMambaOps

register_mamba_ops(CudaMambaOps())
register_mamba_ops(AutoMambaOps())

__all__ = [
    "AutoMambaOps",
    "CudaMambaOps",
    "KernelStatus",
    "KernelUnavailable",
    "conv_kernels",
    "override_kernels",
    "ssd_kernels",
]
