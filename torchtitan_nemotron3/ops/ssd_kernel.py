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

Long rows: ``row_bounds``/``seq_bounds`` (``long_rows.ssd_plan``) cut a call that would
pass the kernel's 32-bit offsets into pieces, the SSD state carried across each cut
(``long_rows.py``); the forward also returns those carried states for the backward.
One piece (``[0, B]``, ``[0, L]``) is the plain single kernel call.
"""

import torch

from .loader import SSDKernels, ssd_kernels
from .long_rows import mamba_ssm_piece, ssd_bwd_pieces, ssd_fwd_pieces


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
    row_bounds: list[int],
    seq_bounds: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD scan + ``D`` skip from the raw ``dt``: output (B, L, H, P) in ``x``'s dtype,
    and the fp32 states carried across the sequence cuts (cuts, B, H, P, N)."""
    kernels = _require_ssd()
    piece_fwd, _ = mamba_ssm_piece(kernels.fwd, kernels.bwd, chunk_size, True, (dt_min, dt_max))
    out_BLHP, carried = ssd_fwd_pieces(
        piece_fwd,
        x_BLHP,
        dt_BLH,
        A_H,
        B_BLGN,
        C_BLGN,
        D_H,
        dt_bias_H,
        seq_idx_BL,
        row_bounds=row_bounds,
        seq_bounds=seq_bounds,
    )
    return out_BLHP.contiguous(), carried


def _carried_like(x_BLHP, B_BLGN, seq_bounds) -> torch.Tensor:
    Bsz, _, H, P = x_BLHP.shape
    return x_BLHP.new_empty(
        (len(seq_bounds) - 2, Bsz, H, P, B_BLGN.shape[-1]), dtype=torch.float32
    )


@mamba_ssd.register_fake
def _(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, D_H, dt_bias_H, seq_idx_BL, chunk_size,
      dt_min, dt_max, row_bounds, seq_bounds):  # fmt: skip
    out = torch.empty_like(x_BLHP, memory_format=torch.contiguous_format)
    return out, _carried_like(x_BLHP, B_BLGN, seq_bounds)


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
    carried: torch.Tensor,
    chunk_size: int,
    dt_min: float,
    dt_max: float,
    row_bounds: list[int],
    seq_bounds: list[int],
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
    kernels = _require_ssd()
    _, piece_bwd = mamba_ssm_piece(kernels.fwd, kernels.bwd, chunk_size, True, (dt_min, dt_max))
    grads = ssd_bwd_pieces(
        piece_bwd,
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
        carried,
        row_bounds=row_bounds,
        seq_bounds=seq_bounds,
    )
    like = (x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, D_H, dt_bias_H)
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, like))


@mamba_ssd_backward.register_fake
def _(dout_BLHP, x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, D_H, dt_bias_H, seq_idx_BL,
      out_BLHP, carried, chunk_size, dt_min, dt_max, row_bounds, seq_bounds):  # fmt: skip
    like = (x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, D_H, dt_bias_H)
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format) for t in like
    )


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, dt_bias, seq_idx, *scalars = inputs
    out, carried = output
    ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, seq_idx, out, carried)
    ctx.scalars = scalars  # chunk_size, dt_min, dt_max, row_bounds, seq_bounds


def _backward(ctx, dout_BLHP, _dcarried):
    x, dt, A, B, C, D, dt_bias, seq_idx, out, carried = ctx.saved_tensors
    chunk_size, dt_min, dt_max, row_bounds, seq_bounds = ctx.scalars
    grads = mamba_ssd_backward(
        dout_BLHP.contiguous(), x, dt, A, B, C, D, dt_bias, seq_idx, out, carried,
        chunk_size, dt_min, dt_max, row_bounds, seq_bounds,
    )  # fmt: skip
    return (*grads, None, None, None, None, None, None)


mamba_ssd.register_autograd(_backward, setup_context=_setup_context)
