"""The two sequence ops of the Mamba2 mixer, behind one small interface.

The mixer never calls a kernel directly: it asks ``get_mamba_ops(name)`` for an
object with ``conv`` and ``scan``. The plain-torch implementation here is exact and
runs anywhere; a fused CUDA implementation (mamba-ssm's Triton SSD, causal-conv1d)
registers under another name with the same signatures and the same semantics,
including ``seq_idx`` for packed documents.
"""

from typing import Protocol

import torch
import torch.nn.functional as F

from .conv import causal_conv1d
from .ssd import ssd_chunked


class MambaOps(Protocol):
    name: str

    def conv(
        self,
        xBC_BLC: torch.Tensor,
        weight_CK: torch.Tensor,
        bias_C: torch.Tensor | None,
        seq_idx_BL: torch.Tensor | None,
    ) -> torch.Tensor:
        """``silu(causal depthwise conv1d(xBC))``, documents kept apart."""
        ...

    def scan(
        self,
        x_BLHP: torch.Tensor,
        dt_BLH: torch.Tensor,
        A_H: torch.Tensor,
        B_BLGN: torch.Tensor,
        C_BLGN: torch.Tensor,
        *,
        D_H: torch.Tensor,
        dt_bias_H: torch.Tensor,
        dt_limit: tuple[float, float],
        chunk_size: int,
        seq_idx_BL: torch.Tensor | None,
    ) -> torch.Tensor:
        """SSD scan plus ``D`` skip, from the raw ``dt`` (softplus(dt + dt_bias),
        clamped to ``dt_limit``, is the op's job so kernels can fuse it)."""
        ...


class TorchMambaOps:
    """Plain torch: exact, differentiable, device-agnostic; the reference."""

    name = "torch"

    def conv(self, xBC_BLC, weight_CK, bias_C, seq_idx_BL):
        return F.silu(causal_conv1d(xBC_BLC, weight_CK, bias_C, seq_idx_BL))

    def scan(
        self,
        x_BLHP,
        dt_BLH,
        A_H,
        B_BLGN,
        C_BLGN,
        *,
        D_H,
        dt_bias_H,
        dt_limit,
        chunk_size,
        seq_idx_BL,
    ):
        compute_dtype = torch.float64 if x_BLHP.dtype == torch.float64 else torch.float32
        dt_BLH = F.softplus(dt_BLH.to(compute_dtype) + dt_bias_H.to(compute_dtype))
        lo, hi = dt_limit
        if lo > 0.0 or hi != float("inf"):
            dt_BLH = dt_BLH.clamp(min=lo, max=hi)
        y_BLHP = ssd_chunked(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, chunk_size, seq_idx_BL)
        y_BLHP = y_BLHP + D_H.to(compute_dtype)[:, None] * x_BLHP.to(compute_dtype)
        return y_BLHP.to(x_BLHP.dtype)


_REGISTRY: dict[str, MambaOps] = {"torch": TorchMambaOps()}
# Registered by ``torchtitan_nemotron3.kernels`` when first asked for: importing it
# defines custom ops but imports no kernel package (those load on first CUDA use).
_KERNEL_BACKENDS = ("cuda", "auto")


def register_mamba_ops(ops: MambaOps) -> None:
    _REGISTRY[ops.name] = ops


def get_mamba_ops(name: str) -> MambaOps:
    """The backend called ``name``: "torch" (exact, any device), "cuda" (mamba-ssm's
    Triton SSD + causal-conv1d, or an error), "auto" (kernels on CUDA where available,
    torch otherwise), or one registered with ``register_mamba_ops``."""
    if name in _KERNEL_BACKENDS and name not in _REGISTRY:
        import torchtitan_nemotron3.kernels  # noqa: F401  (registers them)
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown Mamba2 kernel backend {name!r}; available: {sorted(_REGISTRY)}"
        )
    return _REGISTRY[name]
