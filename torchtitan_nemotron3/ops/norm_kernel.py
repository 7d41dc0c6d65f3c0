"""mamba-ssm's Triton gated group RMSNorm as ``torch.library`` custom ops.

The Mamba2 mixer's output norm, ``RMSNorm(y * silu(z))`` per group of channels times
``weight`` (gate first: mamba-ssm's ``norm_before_gate=False``, ``is_rms_norm=True``),
through ``mamba_ssm.ops.triton.layernorm_gated._layer_norm_fwd/_bwd``. One kernel reads
``y`` and ``z`` once and writes the output, where torch makes several fp32 passes.

Compile-safe like ``ssd_kernel.py``: opaque ops with fake implementations and a
registered backward. The forward op returns ``(out, rstd)``; ``rstd`` (fp32, one per
row and group: (G·M,)) is what the backward kernel needs and is not differentiable.
``gated_rmsnorm`` is the one-output function the backends call.

``y`` and ``z`` are (B, L, I) with unit stride on the channels; ``z`` may be a slice
of the ``in_proj`` output (the kernel takes its row stride). Output and ``dy`` are in
``y``'s dtype, ``dz`` in ``z``'s, ``dweight`` in ``weight``'s; the kernel computes in
fp32.
"""

import torch

from .loader import SSDKernels, ssd_kernels


def _require_norm() -> SSDKernels:
    kernels, status = ssd_kernels()
    if kernels is None or kernels.norm_fwd is None or kernels.norm_bwd is None:
        why = status if kernels is None else f"{status.name} has no gated norm kernel"
        raise RuntimeError(
            f"the gated RMSNorm kernel is not usable ({why}); kernel_backend='auto' "
            "falls back to the torch norm"
        )
    return kernels


def _rows(t_BLI: torch.Tensor) -> torch.Tensor:
    """(B, L, I) as (B·L, I) rows with unit channel stride (a view where possible)."""
    t_MI = t_BLI.reshape(-1, t_BLI.shape[-1])
    return t_MI if t_MI.stride(-1) == 1 else t_MI.contiguous()


@torch.library.custom_op("nemotron3::gated_rmsnorm_fwd", mutates_args=())
def gated_rmsnorm_fwd(
    y_BLI: torch.Tensor,
    z_BLI: torch.Tensor,
    weight_I: torch.Tensor,
    eps: float,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * RMSNorm_groups(y * silu(z)), rstd)``; output in ``y``'s dtype."""
    out_MI, _mean, rstd = _require_norm().norm_fwd(
        _rows(y_BLI),
        weight_I.contiguous(),
        None,
        eps,
        z=_rows(z_BLI),
        group_size=group_size,
        norm_before_gate=False,
        is_rms_norm=True,
    )
    return out_MI.view(y_BLI.shape), rstd


@gated_rmsnorm_fwd.register_fake
def _(y_BLI, z_BLI, weight_I, eps, group_size):
    rows = y_BLI.numel() // y_BLI.shape[-1]
    groups = y_BLI.shape[-1] // group_size
    return (
        torch.empty_like(y_BLI, memory_format=torch.contiguous_format),
        y_BLI.new_empty(groups * rows, dtype=torch.float32),
    )


@torch.library.custom_op("nemotron3::gated_rmsnorm_backward", mutates_args=())
def gated_rmsnorm_backward(
    dout_BLI: torch.Tensor,
    y_BLI: torch.Tensor,
    z_BLI: torch.Tensor,
    weight_I: torch.Tensor,
    rstd: torch.Tensor,
    eps: float,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for (y, z, weight), each in its input's dtype."""
    dy_MI, dweight_I, _dbias, dz_MI = _require_norm().norm_bwd(
        _rows(dout_BLI),
        _rows(y_BLI),
        weight_I.contiguous(),
        None,
        eps,
        None,
        rstd,
        z=_rows(z_BLI),
        group_size=group_size,
        norm_before_gate=False,
        is_rms_norm=True,
    )
    shape = y_BLI.shape
    return (
        dy_MI.to(y_BLI.dtype).reshape(shape).contiguous(),
        dz_MI.to(z_BLI.dtype).reshape(shape).contiguous(),
        dweight_I.to(weight_I.dtype).contiguous(),
    )


@gated_rmsnorm_backward.register_fake
def _(dout_BLI, y_BLI, z_BLI, weight_I, rstd, eps, group_size):
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format)
        for t in (y_BLI, z_BLI, weight_I)
    )


def _setup_context(ctx, inputs, output):
    y_BLI, z_BLI, weight_I, eps, group_size = inputs
    _out, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(y_BLI, z_BLI, weight_I, rstd)
    ctx.scalars = (eps, group_size)


def _backward(ctx, dout_BLI, _drstd):
    y_BLI, z_BLI, weight_I, rstd = ctx.saved_tensors
    dy, dz, dweight = gated_rmsnorm_backward(
        dout_BLI.contiguous(), y_BLI, z_BLI, weight_I, rstd, *ctx.scalars
    )
    return dy, dz, dweight, None, None


gated_rmsnorm_fwd.register_autograd(_backward, setup_context=_setup_context)


def gated_rmsnorm(
    y_BLI: torch.Tensor,
    z_BLI: torch.Tensor,
    weight_I: torch.Tensor,
    eps: float,
    group_size: int,
) -> torch.Tensor:
    """``weight * RMSNorm(y * silu(z))`` over groups of ``group_size`` channels."""
    return gated_rmsnorm_fwd(y_BLI, z_BLI, weight_I, eps, group_size)[0]
