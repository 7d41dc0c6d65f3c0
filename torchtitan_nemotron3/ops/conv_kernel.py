"""causal-conv1d's fused ``silu(causal depthwise conv)`` as a ``torch.library`` custom op.

Same reason as ``ssd_kernel.py``: an opaque node with a fake implementation compiles
under ``fullgraph=True``; causal-conv1d's ``CausalConv1dFn`` does not.

Layout: the mixer holds ``xBC`` as (B, L, X), a slice of the ``in_proj`` output. The
kernel reads that as its "channel-last" (B, X, L) layout without a copy when the
strides and the start address are 16-byte friendly (it requires strides that are
multiples of 8 elements, and only the channel-last kernel takes ``seq_idx``);
otherwise the op copies to contiguous first. Output and gradients are contiguous
(B, L, X). The bias is required here (the caller passes zeros when the model has
none) and must have the weight's dtype, as the kernel demands.
"""

import torch

from .loader import ConvKernels, conv_kernels


def _require_conv() -> ConvKernels:
    kernels, status = conv_kernels()
    if kernels is None:
        raise RuntimeError(
            f"the causal conv kernel is not usable ({status}); kernel_backend='auto' "
            "falls back to the torch conv"
        )
    return kernels


def _channel_last_BLX(x_BLX: torch.Tensor) -> torch.Tensor:
    s0, s1, s2 = x_BLX.stride()
    aligned = s2 == 1 and s1 % 8 == 0 and s0 % 8 == 0 and x_BLX.data_ptr() % 16 == 0
    return x_BLX if aligned else x_BLX.contiguous()


@torch.library.custom_op("nemotron3::causal_conv1d_silu", mutates_args=())
def causal_conv1d_silu(
    x_BLX: torch.Tensor,
    weight_XK: torch.Tensor,
    bias_X: torch.Tensor,
    seq_idx_BL: torch.Tensor | None,
) -> torch.Tensor:
    """``silu(bias + causal depthwise conv(x))`` per channel, documents kept apart."""
    x_BXL = _channel_last_BLX(x_BLX).transpose(1, 2)
    out_BXL = _require_conv().fwd(
        x_BXL, weight_XK, bias_X, seq_idx_BL, None, None, True
    )
    return out_BXL.transpose(1, 2).contiguous()


@torch.library.custom_op("nemotron3::causal_conv1d_silu_backward", mutates_args=())
def causal_conv1d_silu_backward(
    dout_BLX: torch.Tensor,
    x_BLX: torch.Tensor,
    weight_XK: torch.Tensor,
    bias_X: torch.Tensor,
    seq_idx_BL: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for (x, weight, bias), each in its input's dtype."""
    x_BXL = _channel_last_BLX(x_BLX).transpose(1, 2)
    dout_BXL = dout_BLX.contiguous().transpose(1, 2)
    dx_BXL, dweight_XK, dbias_X, _ = _require_conv().bwd(
        x_BXL, weight_XK, bias_X, dout_BXL, seq_idx_BL, None, None, None, False, True
    )
    return (
        dx_BXL.transpose(1, 2).to(x_BLX.dtype).contiguous(),
        dweight_XK.to(weight_XK.dtype).contiguous(),
        dbias_X.to(bias_X.dtype).contiguous(),
    )


def register_conv_autograd(op, backward_op) -> None:
    """Fakes and autograd for a ``(x_BLX, weight_XK, bias_X, seq_idx_BL) -> y_BLX``
    conv op whose ``backward_op(dout, x, weight, bias, seq_idx)`` returns (dx,
    dweight, dbias); shared by causal-conv1d's and fla-core's ops."""

    @op.register_fake
    def _(x_BLX, weight_XK, bias_X, seq_idx_BL):
        return torch.empty_like(x_BLX, memory_format=torch.contiguous_format)

    @backward_op.register_fake
    def _(dout_BLX, x_BLX, weight_XK, bias_X, seq_idx_BL):
        return tuple(
            torch.empty_like(t, memory_format=torch.contiguous_format)
            for t in (x_BLX, weight_XK, bias_X)
        )

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)  # x, weight, bias, seq_idx

    def backward(ctx, dout_BLX):
        return (*backward_op(dout_BLX, *ctx.saved_tensors), None)

    op.register_autograd(backward, setup_context=setup_context)


register_conv_autograd(causal_conv1d_silu, causal_conv1d_silu_backward)
