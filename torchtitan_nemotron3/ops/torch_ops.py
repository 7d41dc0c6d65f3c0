"""The Mamba2 mixer's ops: the interface, and its exact torch backend.

The mixer never calls a kernel directly: it holds an object with ``conv``, ``scan``
(the two sequence ops) and ``gated_norm`` (its output norm), from
``ops.mamba_ops(backend)``. ``TorchMambaOps`` is exact and runs anywhere; the kernel
backends (``kernel_ops.py``) have the same signatures and semantics, including
``seq_idx`` for packed documents.
"""

from typing import Protocol

import torch
import torch.nn.functional as F

from .conv import causal_conv1d
from .ssd import ssd_scan


class MambaOps(Protocol):
    name: str

    def conv(
        self,
        xBC_BLX: torch.Tensor,
        weight_XK: torch.Tensor,
        bias_X: torch.Tensor | None,
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

    def gated_norm(
        self,
        y_BLI: torch.Tensor,
        z_BLI: torch.Tensor,
        weight_I: torch.Tensor,
        *,
        eps: float,
        n_groups: int,
    ) -> torch.Tensor:
        """``weight * RMSNorm(y * silu(z))``, the norm over each of ``n_groups`` groups
        of ``I / n_groups`` channels: gate first, then norm (NemotronH's order),
        computed in fp32 (torch: fp64 for fp64 inputs). The result is in ``y``'s
        dtype (torch: promoted with the weight's); the mixer casts it for
        ``out_proj``."""
        ...


class TorchMambaOps:
    """Plain torch: exact, differentiable, device-agnostic; the reference."""

    name = "torch"

    def conv(self, xBC_BLX, weight_XK, bias_X, seq_idx_BL):
        return F.silu(causal_conv1d(xBC_BLX, weight_XK, bias_X, seq_idx_BL))

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
        y_BLHP, _ = ssd_scan(
            x_BLHP,
            dt_BLH,
            A_H,
            B_BLGN,
            C_BLGN,
            chunk_size,
            D_H=D_H,
            dt_bias_H=dt_bias_H,
            dt_limit=dt_limit,
            seq_idx_BL=seq_idx_BL,
        )
        return y_BLHP

    def gated_norm(self, y_BLI, z_BLI, weight_I, *, eps, n_groups):
        in_dtype = y_BLI.dtype
        # fp32, or fp64 for fp64 inputs (exact references stay exact)
        cd = torch.promote_types(in_dtype, torch.float32)
        h_BLI = y_BLI.to(cd) * F.silu(z_BLI.to(cd))
        h_BLGW = h_BLI.unflatten(-1, (n_groups, -1))
        h_BLGW = h_BLGW * torch.rsqrt(h_BLGW.pow(2).mean(-1, keepdim=True) + eps)
        return weight_I * h_BLGW.flatten(-2).to(in_dtype)
