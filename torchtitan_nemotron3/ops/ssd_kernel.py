"""mamba-ssm's Triton SSD as a ``torch.library`` custom op, so compiled blocks can hold it.

Dynamo cannot trace mamba-ssm's ``MambaChunkScanCombinedFn`` (an autograd.Function
around Triton launches with Python-side shape logic); TorchTitan compiles every block
with ``fullgraph=True``, so a graph break is an error. As a custom op the scan is one
opaque node with a fake (shape) implementation for tracing and a registered
backward that is itself an opaque custom op. Inputs are plain tensors (FSDP2 has
all-gathered the parameters before the block runs).

Forward saves its inputs and output, as mamba-ssm's own autograd.Function does;
the backward recomputes the chunk states inside the kernel call. The op applies
``softplus(dt + dt_bias)``, the ``dt_limit`` clamp and the ``D`` skip, like
``TorchMambaOps.scan``. ``dt_limit`` travels as two floats (the schema has no tuples).
"""

import torch

from .loader import SSDKernels, ssd_kernels


def _require_ssd() -> SSDKernels:
    kernels, status = ssd_kernels()
    if kernels is None:
        raise RuntimeError(
            f"the SSD kernel is not usable ({status}); kernel_backend='auto' falls "
            "back to the torch SSD"
        )
    return kernels


@torch.library.custom_op("nemotron3::mamba_ssd", mutates_args=())
def mamba_ssd(
    x_BLHP: torch.Tensor,
    dt_BLH: torch.Tensor,
    A_H: torch.Tensor,
    B_BLGN: torch.Tensor,
    C_BLGN: torch.Tensor,
    D_H: torch.Tensor,
    dt_bias_H: torch.Tensor,
    seq_idx_BL: torch.Tensor | None,
    chunk_size: int,
    dt_min: float,
    dt_max: float,
) -> torch.Tensor:
    """SSD scan + ``D`` skip from the raw ``dt``; output (B, L, H, P) in ``x``'s dtype."""
    out_BLHP, *_ = _require_ssd().fwd(
        x_BLHP,
        dt_BLH,
        A_H,
        B_BLGN,
        C_BLGN,
        chunk_size,
        D=D_H,
        dt_bias=dt_bias_H,
        seq_idx=seq_idx_BL,
        dt_softplus=True,
        dt_limit=(dt_min, dt_max),
    )
    return out_BLHP.contiguous()


@mamba_ssd.register_fake
def _(
    x_BLHP,
    dt_BLH,
    A_H,
    B_BLGN,
    C_BLGN,
    D_H,
    dt_bias_H,
    seq_idx_BL,
    chunk_size,
    dt_min,
    dt_max,
):
    return torch.empty_like(x_BLHP, memory_format=torch.contiguous_format)


@torch.library.custom_op("nemotron3::mamba_ssd_backward", mutates_args=())
def mamba_ssd_backward(
    dout_BLHP: torch.Tensor,
    x_BLHP: torch.Tensor,
    dt_BLH: torch.Tensor,
    A_H: torch.Tensor,
    B_BLGN: torch.Tensor,
    C_BLGN: torch.Tensor,
    D_H: torch.Tensor,
    dt_bias_H: torch.Tensor,
    seq_idx_BL: torch.Tensor | None,
    out_BLHP: torch.Tensor,
    chunk_size: int,
    dt_min: float,
    dt_max: float,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """Gradients for (x, dt, A, B, C, D, dt_bias), each in its input's dtype."""
    dx, ddt, dA, dB, dC, dD, _dz, ddt_bias, _dinit = _require_ssd().bwd(
        dout_BLHP,
        x_BLHP,
        dt_BLH,
        A_H,
        B_BLGN,
        C_BLGN,
        out_BLHP,
        chunk_size,
        D=D_H,
        dt_bias=dt_bias_H,
        seq_idx=seq_idx_BL,
        dt_softplus=True,
        dt_limit=(dt_min, dt_max),
    )
    like = (x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, D_H, dt_bias_H)
    grads = (dx, ddt, dA, dB, dC, dD, ddt_bias)
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, like))


@mamba_ssd_backward.register_fake
def _(
    dout_BLHP,
    x_BLHP,
    dt_BLH,
    A_H,
    B_BLGN,
    C_BLGN,
    D_H,
    dt_bias_H,
    seq_idx_BL,
    out_BLHP,
    chunk_size,
    dt_min,
    dt_max,
):
    like = (x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, D_H, dt_bias_H)
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format) for t in like
    )


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, dt_bias, seq_idx, chunk_size, dt_min, dt_max = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, seq_idx, output)
    ctx.scalars = (chunk_size, dt_min, dt_max)


def _backward(ctx, dout_BLHP):
    x, dt, A, B, C, D, dt_bias, seq_idx, out = ctx.saved_tensors
    grads = mamba_ssd_backward(
        dout_BLHP.contiguous(), x, dt, A, B, C, D, dt_bias, seq_idx, out, *ctx.scalars
    )
    return (*grads, None, None, None, None)


mamba_ssd.register_autograd(_backward, setup_context=_setup_context)
