"""The Mamba2 mixer of NemotronH (``M`` layers)."""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from torchtitan.models.common.linear import Linear
from torchtitan.models.common.nn_modules import Conv1d
from torchtitan.protocols.module import Module

from ..ops import KERNEL_BACKENDS, TorchMambaOps, mamba_ops
from .context_parallel import CPLayout
from .mamba2_cp import ContextParallelMambaOps


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


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's shard of a tensor-parallel parameter (the tensor itself when
    unsharded): the mixer's core runs on local heads only."""
    return t.to_local() if isinstance(t, DTensor) else t


class Mamba2InProj(Module):
    """The input projection to ``z | x | B | C | dt``, held as five weights.

    The hub stores it as one packed matrix; colwise-sharding that as one block
    would hand each TP rank whole parts (rank 0 all of z, ...) instead of its
    own heads' rows of every part. Five weights shard each part by head (Megatron's
    layout) and still run as one GEMM: the output packs this rank's parts,
    ``[z | x | B | C | dt]`` of its own heads and groups, which only the mixer
    reads (under TP its global column order is rank-major).
    """

    PARTS = ("z", "x", "B", "C", "dt")

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        z: Linear.Config
        x: Linear.Config
        B: Linear.Config
        C: Linear.Config
        dt: Linear.Config

        @property
        def in_features(self) -> int:
            return self.z.in_features

        @property
        def out_features(self) -> int:
            return sum(getattr(self, p).out_features for p in Mamba2InProj.PARTS)

        @property
        def bias(self) -> bool:
            return self.z.bias

    def __init__(self, config: Config):
        super().__init__()
        for part in self.PARTS:
            setattr(self, part, getattr(config, part).build())

    def _parts(self) -> list[Linear]:
        return [getattr(self, part) for part in self.PARTS]

    @property
    def weight(self) -> torch.Tensor:
        """The packed weight, rows ``z | x | B | C | dt`` (the hub's layout; this
        rank's rows of each part under TP)."""
        return torch.cat([_local(p.weight) for p in self._parts()])

    @property
    def bias(self) -> torch.Tensor | None:
        if self.z.bias is None:
            return None
        return torch.cat([_local(p.bias) for p in self._parts()])

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        """``[z | x | B | C | dt]`` of this rank's heads (all heads unsharded)."""
        out_BLZ = F.linear(x_BLD, self.weight, self.bias)
        # LoRA (torchtitan_nemotron3/lora): the packed GEMM reads only the parts'
        # base weights, so each adapted part adds alpha/r · B(A x) to its columns.
        parts = self._parts()
        if not any(hasattr(p, "lora_a") for p in parts):
            return out_BLZ
        deltas = [
            p._lora_scaling
            * F.linear(F.linear(x_BLD, _local(p.lora_a.weight)), _local(p.lora_b.weight))
            if hasattr(p, "lora_a")
            else out_BLZ.new_zeros(*out_BLZ.shape[:-1], _local(p.weight).shape[0])
            for p in parts
        ]
        return out_BLZ + torch.cat(deltas, dim=-1)


class Mamba2Conv(Module):
    """The depthwise causal conv over ``x | B | C``, held as three convs.

    Split for the same reason as ``Mamba2InProj`` (channels shard by head and
    group); the ops run one depthwise conv over the concatenation.
    """

    PARTS = ("x", "B", "C")

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        x: Conv1d.Config
        B: Conv1d.Config
        C: Conv1d.Config

        @property
        def in_channels(self) -> int:
            return sum(getattr(self, p).in_channels for p in Mamba2Conv.PARTS)

        @property
        def out_channels(self) -> int:
            return self.in_channels

        @property
        def kernel_size(self) -> int:
            return self.x.kernel_size

        @property
        def bias(self) -> bool:
            return self.x.bias

    def __init__(self, config: Config):
        super().__init__()
        for part in self.PARTS:
            setattr(self, part, getattr(config, part).build())

    def _parts(self) -> list[nn.Module]:
        return [getattr(self, part) for part in self.PARTS]

    @property
    def weight(self) -> torch.Tensor:
        """The packed ``[X, 1, K]`` weight (this rank's channels under TP)."""
        return torch.cat([_local(p.weight) for p in self._parts()])

    @property
    def bias(self) -> torch.Tensor | None:
        if self.x.bias is None:
            return None
        return torch.cat([_local(p.bias) for p in self._parts()])


class Mamba2Mixer(Module):
    """in_proj → (z | xBC | dt); xBC → causal conv + silu → (x | B | C); SSD scan with
    ``D`` skip; gated group RMSNorm with z; out_proj.

    ``A_log``, ``D`` and ``dt_bias`` are per-head parameters owned here, the norm's
    weight by ``norm``; the conv, the scan and the gated norm are the ``ops``
    package's (torch or GPU kernels, by ``kernel_backend``).

    Under tensor parallelism (``tensor_parallel.py``) every per-head and per-group
    tensor is sharded by head, so the core (conv, scan, gated norm) runs on this
    rank's heads and groups as plain local tensors; the sizes below are then read
    off the local tensors, never assumed global. ``out_proj`` sums the ranks.

    Under context parallelism (``set_context_parallel``) the ops are wrapped to run
    on this rank's sequence shard exactly (``mamba2_cp.py``); ``seq_idx`` must then
    be the global document ids (``context_parallel.global_seq_idx``).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        num_heads: int
        head_dim: int
        state_size: int
        n_groups: int
        in_proj: Mamba2InProj.Config
        out_proj: Linear.Config
        conv1d: Mamba2Conv.Config
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

    def set_context_parallel(self, layout: CPLayout | None) -> None:
        """Run on the CP shard ``layout`` describes (None: the whole row again)."""
        ops = self.ops
        if isinstance(ops, ContextParallelMambaOps):
            ops = ops.inner
        self.ops = ops if layout is None else ContextParallelMambaOps(ops, layout)

    def forward(
        self, x_BLD: torch.Tensor, seq_idx_BL: torch.Tensor | None = None
    ) -> torch.Tensor:
        zxBCdt_BLZ = self.in_proj(x_BLD)
        if isinstance(zxBCdt_BLZ, DTensor):
            # TP: this rank's heads, columns sharded (Shard(-1)); y keeps that layout.
            y_BLI = DTensor.from_local(
                self._core(zxBCdt_BLZ.to_local(), seq_idx_BL),
                zxBCdt_BLZ.device_mesh,
                zxBCdt_BLZ.placements,
                run_check=False,
            )
        else:
            y_BLI = self._core(zxBCdt_BLZ, seq_idx_BL)
        return self.out_proj(y_BLI.to(x_BLD.dtype))

    def _core(
        self, zxBCdt_BLZ: torch.Tensor, seq_idx_BL: torch.Tensor | None
    ) -> torch.Tensor:
        """conv + scan + gated norm on local tensors: the heads (H) and groups (G)
        of this rank, or all of them unsharded."""
        A_log_H = _local(self.A_log)
        H, P, N = A_log_H.numel(), self.head_dim, self.state_size
        G = self.n_groups * H // self.num_heads
        I, GN = H * P, G * N
        z_BLI, xBC_BLX, dt_BLH = zxBCdt_BLZ.split([I, I + 2 * GN, H], dim=-1)
        xBC_BLX = self.ops.conv(
            xBC_BLX, self.conv1d.weight[:, 0, :], self.conv1d.bias, seq_idx_BL
        )
        x_BLI, B_BLG, C_BLG = xBC_BLX.split([I, GN, GN], dim=-1)
        y_BLHP = self.ops.scan(
            x_BLI.unflatten(-1, (H, P)),
            dt_BLH,
            # fp32 (fp64 for an fp64 model, so its gradient is exact too)
            -torch.exp(A_log_H.to(torch.promote_types(A_log_H.dtype, torch.float32))),
            B_BLG.unflatten(-1, (G, N)),
            C_BLG.unflatten(-1, (G, N)),
            D_H=_local(self.D),
            dt_bias_H=_local(self.dt_bias),
            dt_limit=self.time_step_limit,
            chunk_size=self.chunk_size,
            seq_idx_BL=seq_idx_BL,
        )
        # Groups never straddle ranks (n_groups % tp == 0): the norm stays local.
        return self.ops.gated_norm(
            y_BLHP.flatten(-2),
            z_BLI,
            _local(self.norm.weight),
            eps=self.norm.eps,
            n_groups=G,
        )

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
