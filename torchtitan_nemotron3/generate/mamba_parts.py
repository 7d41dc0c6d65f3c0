"""The one place decoding reads a Mamba2 mixer's parameters.

Decoding cannot call the mixer's ``forward`` (it returns neither the final SSM state
nor the conv inputs), so it re-does the mixer's math on these parts. Keeping every
read of the mixer here means a change of its parameter layout (e.g. a packed
``in_proj`` split into per-part projections for tensor parallelism) is absorbed by
this file alone. The projections are called as modules, not as raw weights, so
wrappers on them (LoRA on the part projections) take effect in decoding too.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MambaParts:
    """A Mamba2 mixer seen as the pieces of its math (shape suffixes as in the
    package docstring)."""

    num_heads: int
    head_dim: int
    n_groups: int
    state_size: int
    chunk_size: int
    dt_limit: tuple[float, float]
    # x_BLD -> (z_BLI, xBC_BLX, dt_BLH): the input projections, xBC in conv order.
    project: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    conv_weight_XK: torch.Tensor
    conv_bias_X: torch.Tensor | None
    # silu(causal conv) over a whole sequence: the mixer's own op (torch or kernel).
    conv: Callable[..., torch.Tensor]
    A_log_H: torch.Tensor
    D_H: torch.Tensor
    dt_bias_H: torch.Tensor
    # (y_BLI, z_BLI) -> weight * RMSNorm(y * silu(z)) per group, the mixer's op.
    gated_norm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    out_proj: Callable[[torch.Tensor], torch.Tensor]

    @property
    def conv_width(self) -> int:
        return self.conv_weight_XK.size(-1)


def _projection(in_proj):
    """x_BLD -> (z, xBC, dt) through the per-part projections ``in_proj.z``, ``.x``,
    ``.B``, ``.C``, ``.dt`` one by one: for one token that reads each weight once,
    where ``in_proj``'s own forward first packs them (a copy of the whole matrix per
    call, negligible over a training sequence, not over one token)."""
    z, x, B, C, dt = (getattr(in_proj, part) for part in ("z", "x", "B", "C", "dt"))

    def project(x_BLD):
        xBC_BLX = torch.cat([x(x_BLD), B(x_BLD), C(x_BLD)], dim=-1)
        return z(x_BLD), xBC_BLX, dt(x_BLD)

    return project


def mamba_parts(mixer) -> MambaParts:
    """The parts of ``mixer`` (a ``Mamba2Mixer``, unsharded), in its layout of
    2026-12-01: ``in_proj`` and ``conv1d`` hold one module per part (z, x, B, C, dt;
    x, B, C) for tensor parallelism; ``conv1d.weight`` packs the conv parts into
    ``[X, 1, K]`` (a concatenation: read once per prefill, not per step)."""

    def gated_norm(y_BLI, z_BLI):
        return mixer.ops.gated_norm(
            y_BLI,
            z_BLI,
            mixer.norm.weight,
            eps=mixer.norm.eps,
            n_groups=mixer.norm.n_groups,
        )

    return MambaParts(
        num_heads=mixer.num_heads,
        head_dim=mixer.head_dim,
        n_groups=mixer.n_groups,
        state_size=mixer.state_size,
        chunk_size=mixer.chunk_size,
        dt_limit=tuple(mixer.time_step_limit),
        project=_projection(mixer.in_proj),
        conv_weight_XK=mixer.conv1d.weight[:, 0, :],
        conv_bias_X=mixer.conv1d.bias,
        conv=mixer.ops.conv,
        A_log_H=mixer.A_log,
        D_H=mixer.D,
        dt_bias_H=mixer.dt_bias,
        gated_norm=gated_norm,
        out_proj=mixer.out_proj,
    )
