"""The Mamba2 mixer of NemotronH (``M`` layers)."""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from torchtitan.models.common.linear import Linear
from torchtitan.models.common.nn_modules import Conv1d
from torchtitan.protocols.module import Module

from ..ops import KERNEL_BACKENDS, TorchMambaOps, mamba_ops


class GatedGroupRMSNorm(Module):
    """``weight * RMSNorm(y * silu(z))`` over groups of ``dim / n_groups`` channels.

    Gate first, norm second, and per group: this is what NemotronH was trained with
    (a whole-width norm, or norm-before-gate, is a different model).

    The module holds the weight and the settings; the math is the ops' ``gated_norm``
    (``Mamba2Mixer`` calls its backend's, torch or kernel). ``forward`` is the torch
    one, for use on its own.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        dim: int
        n_groups: int
        eps: float = 1e-5

    def __init__(self, config: Config):
        super().__init__()
        self.n_groups = config.n_groups
        self.eps = config.eps
        self.weight = nn.Parameter(torch.empty(config.dim))

    def forward(self, y_BLI: torch.Tensor, z_BLI: torch.Tensor) -> torch.Tensor:
        return TorchMambaOps().gated_norm(
            y_BLI, z_BLI, self.weight, eps=self.eps, n_groups=self.n_groups
        )

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Mamba2Mixer(Module):
    """in_proj → (z | xBC | dt); xBC → causal conv + silu → (x | B | C); SSD scan with
    ``D`` skip; gated group RMSNorm with z; out_proj.

    ``A_log``, ``D`` and ``dt_bias`` are per-head parameters owned here, the norm's
    weight by ``norm``; the conv, the scan and the gated norm are the ``ops``
    package's (torch or GPU kernels, by ``kernel_backend``).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        num_heads: int
        head_dim: int
        state_size: int
        n_groups: int
        in_proj: Linear.Config
        out_proj: Linear.Config
        conv1d: Conv1d.Config
        norm: GatedGroupRMSNorm.Config
        chunk_size: int = 128
        time_step_limit: tuple[float, float] = (0.0, float("inf"))
        # from-scratch init of A_log, dt_bias (mamba-ssm's recipe)
        A_init_range: tuple[float, float] = (1.0, 16.0)
        time_step_min: float = 1e-3
        time_step_max: float = 0.1
        time_step_floor: float = 1e-4
        # The conv, scan and norm implementation (``ops.mamba_ops``): "auto" runs the GPU
        # kernels on CUDA tensors where installed and the exact torch ops otherwise.
        kernel_backend: str = "auto"

        def __post_init__(self):
            if self.kernel_backend not in KERNEL_BACKENDS:
                raise ValueError(
                    f"Mamba2Mixer kernel_backend={self.kernel_backend!r}: choose one "
                    f"of {KERNEL_BACKENDS}"
                )

    def __init__(self, config: Config):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.state_size = config.state_size
        self.n_groups = config.n_groups
        self.d_inner = config.num_heads * config.head_dim
        self.chunk_size = config.chunk_size
        self.time_step_limit = tuple(config.time_step_limit)
        self.A_init_range = config.A_init_range
        self.time_step_range = (config.time_step_min, config.time_step_max)
        self.time_step_floor = config.time_step_floor

        self.in_proj = config.in_proj.build()
        self.conv1d = config.conv1d.build()
        self.norm = config.norm.build()
        self.out_proj = config.out_proj.build()
        self.A_log = nn.Parameter(torch.empty(config.num_heads))
        self.D = nn.Parameter(torch.empty(config.num_heads))
        self.dt_bias = nn.Parameter(torch.empty(config.num_heads))
        self.ops = mamba_ops(config.kernel_backend)

    def forward(
        self, x_BLD: torch.Tensor, seq_idx_BL: torch.Tensor | None = None
    ) -> torch.Tensor:
        Bsz, L, _ = x_BLD.shape
        GN = self.n_groups * self.state_size
        z_BLI, xBC_BLX, dt_BLH = self.in_proj(x_BLD).split(
            [self.d_inner, self.d_inner + 2 * GN, self.num_heads], dim=-1
        )
        xBC_BLX = self.ops.conv(
            xBC_BLX, self.conv1d.weight[:, 0, :], self.conv1d.bias, seq_idx_BL
        )
        x_BLI, B_BLG, C_BLG = xBC_BLX.split([self.d_inner, GN, GN], dim=-1)
        y_BLHP = self.ops.scan(
            x_BLI.unflatten(-1, (self.num_heads, self.head_dim)),
            dt_BLH,
            -torch.exp(self.A_log.float()),
            B_BLG.unflatten(-1, (self.n_groups, self.state_size)),
            C_BLG.unflatten(-1, (self.n_groups, self.state_size)),
            D_H=self.D,
            dt_bias_H=self.dt_bias,
            dt_limit=self.time_step_limit,
            chunk_size=self.chunk_size,
            seq_idx_BL=seq_idx_BL,
        )
        y_BLI = self.ops.gated_norm(
            y_BLHP.flatten(-2),
            z_BLI,
            self.norm.weight,
            eps=self.norm.eps,
            n_groups=self.norm.n_groups,
        )
        return self.out_proj(y_BLI.to(x_BLD.dtype))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A = -U[A_init_range]; D = 1; dt_bias = softplus⁻¹(dt), dt log-uniform in
        [time_step_min, time_step_max] and floored, so the initial steps span scales."""
        lo, hi = self.A_init_range
        self.A_log.uniform_(lo, hi).log_()
        self.D.fill_(1.0)
        dt_min, dt_max = self.time_step_range
        dt = self.dt_bias
        dt.uniform_(math.log(dt_min), math.log(dt_max)).exp_()
        dt.clamp_(min=self.time_step_floor)
        # softplus⁻¹(dt) = dt + log(1 - exp(-dt))
        dt.add_(torch.log(-torch.expm1(-dt)))
