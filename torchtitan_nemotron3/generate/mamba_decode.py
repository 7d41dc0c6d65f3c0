"""A Mamba2 mixer over a prompt (keeping its state) and then one token at a time.

Prefill is the mixer's forward with the chunked SSD scan asked for its final state
(``ops.ssd.ssd_scan(final_state=True)``, the same scan the torch path runs, so the
prompt's outputs are the forward's); the step is the recurrence the scan evaluates
in chunks, for one token:

    conv:  xBC_t' = silu(bias + sum_k w[:, k] * xBC_{t-K+1+k})     (last K-1 inputs kept)
    SSM:   state = exp(dt_t A) * state + dt_t x_t ⊗ B_t;   y_t = state C_t + D x_t

with ``dt_t = clamp(softplus(dt_raw + dt_bias))``, then the gated norm and
``out_proj`` as in the forward. Every parameter read goes through ``mamba_parts``.
"""

import torch
import torch.nn.functional as F

from ..ops.ssd import ssd_scan
from .cache import MambaState
from .mamba_parts import MambaParts


def _split_xBC(p: MambaParts, xBC):
    I, GN = p.num_heads * p.head_dim, p.n_groups * p.state_size
    x, B, C = xBC.split([I, GN, GN], dim=-1)
    return (
        x.unflatten(-1, (p.num_heads, p.head_dim)),
        B.unflatten(-1, (p.n_groups, p.state_size)),
        C.unflatten(-1, (p.n_groups, p.state_size)),
    )


def _last_inputs(xBC_BLX: torch.Tensor, n: int) -> torch.Tensor:
    """The last ``n`` rows of the sequence, left-padded with zeros when shorter
    (the causal conv's own padding)."""
    L = xBC_BLX.size(1)
    if L >= n:
        return xBC_BLX[:, L - n :].clone()
    return F.pad(xBC_BLX, (0, 0, n - L, 0))


def mamba_prefill(
    p: MambaParts, x_BLD: torch.Tensor
) -> tuple[torch.Tensor, MambaState]:
    """The mixer's output over the whole prompt and the state after its last token."""
    z_BLI, xBC_BLX, dt_BLH = p.project(x_BLD)
    conv_BKX = _last_inputs(xBC_BLX, p.conv_width - 1)
    xBC_BLX = p.conv(xBC_BLX, p.conv_weight_XK, p.conv_bias_X, None)
    x_BLHP, B_BLGN, C_BLGN = _split_xBC(p, xBC_BLX)
    y_BLHP, ssm_BHPN = ssd_scan(
        x_BLHP,
        dt_BLH,
        -torch.exp(p.A_log_H.float()),
        B_BLGN,
        C_BLGN,
        p.chunk_size,
        D_H=p.D_H,
        dt_bias_H=p.dt_bias_H,
        dt_limit=p.dt_limit,
        final_state=True,
    )
    y_BLI = p.gated_norm(y_BLHP.flatten(-2), z_BLI)
    return p.out_proj(y_BLI.to(x_BLD.dtype)), MambaState(conv_BKX, ssm_BHPN)


def mamba_step(p: MambaParts, x_B1D: torch.Tensor, state: MambaState) -> torch.Tensor:
    """The mixer's output for one more token; ``state`` is advanced in place. Costs
    the same at any position: nothing here depends on the length so far."""
    z_B1I, xBC_B1X, dt_B1H = p.project(x_B1D)
    window_BKX = torch.cat([state.conv_BKX, xBC_B1X], dim=1)
    state.conv_BKX = window_BKX[:, 1:]
    cdt = state.ssm_BHPN.dtype  # fp32 (fp64 for fp64 models), as the scan computes
    conv_BX = torch.einsum("bkx,xk->bx", window_BKX.to(cdt), p.conv_weight_XK.to(cdt))
    if p.conv_bias_X is not None:
        conv_BX = conv_BX + p.conv_bias_X.to(cdt)
    xBC_BX = F.silu(conv_BX).to(x_B1D.dtype)
    x_BHP, B_BGN, C_BGN = (t.to(cdt) for t in _split_xBC(p, xBC_BX))

    dt_BH = F.softplus(dt_B1H[:, 0].to(cdt) + p.dt_bias_H.to(cdt))
    lo, hi = p.dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt_BH = dt_BH.clamp(min=lo, max=hi)
    decay_BH = torch.exp(dt_BH * -torch.exp(p.A_log_H.to(cdt)))
    R = p.num_heads // p.n_groups
    B_BHN = B_BGN.repeat_interleave(R, dim=1)
    C_BHN = C_BGN.repeat_interleave(R, dim=1)
    state.ssm_BHPN = decay_BH[..., None, None] * state.ssm_BHPN + (
        (dt_BH[..., None] * x_BHP)[..., None] * B_BHN[:, :, None, :]
    )
    y_BHP = torch.einsum("bhpn,bhn->bhp", state.ssm_BHPN, C_BHN)
    y_BHP = y_BHP + p.D_H.to(cdt)[:, None] * x_BHP
    y_B1I = y_BHP.to(x_B1D.dtype).flatten(-2)[:, None]
    y_B1I = p.gated_norm(y_B1I, z_B1I)
    return p.out_proj(y_B1I.to(x_B1D.dtype))
