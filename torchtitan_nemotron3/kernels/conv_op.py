"""causal-conv1d's fused ``silu(causal depthwise conv)`` as a ``torch.library`` custom op.

Same reason as ``ssd_op.py``: an opaque node with a fake implementation compiles
under ``fullgraph=True``; causal-conv1d's ``CausalConv1dFn`` does not.

Layout: the mixer holds ``xBC`` as (B, L, C), a slice of the ``in_proj`` output. The
kernel reads that as its "channel-last" (B, C, L) layout without a copy when the
strides and the start address are 16-byte friendly (it requires strides that are
multiples of 8 elements, and only the channel-last kernel takes ``seq_idx``);
otherwise the op copies to contiguous first. Output and gradients are contiguous
(B, L, C). The bias is required here (the caller passes zeros when the model has
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


def _channel_last_BLC(x_BLC: torch.Tensor) -> torch.Tensor:
    s0, s1, s2 = x_BLC.stride()
    aligned = s2 == 1 and s1 % 8 == 0 and s0 % 8 == 0 and x_BLC.data_ptr() % 16 == 0
    return x_BLC if aligned else x_BLC.contiguous()


@torch.library.custom_op("nemotron3::causal_conv1d_silu", mutates_args=())
def causal_conv1d_silu(
    x_BLC: torch.Tensor,
    weight_CK: torch.Tensor,
    bias_C: torch.Tensor,
    seq_idx_BL: torch.Tensor | None,
) -> torch.Tensor:
    """``silu(bias + causal depthwise conv(x))`` per channel, documents kept apart."""
    x_BCL = _channel_last_BLC(x_BLC).transpose(1, 2)
    out_BCL = _require_conv().fwd(
        x_BCL, weight_CK, bias_C, seq_idx_BL, None, None, True
    )
    return out_BCL.transpose(1, 2).contiguous()


@causal_conv1d_silu.register_fake
def _(x_BLC, weight_CK, bias_C, seq_idx_BL):
    return torch.empty_like(x_BLC, memory_format=torch.contiguous_format)


@torch.library.custom_op("nemotron3::causal_conv1d_silu_backward", mutates_args=())
def causal_conv1d_silu_backward(
    dout_BLC: torch.Tensor,
    x_BLC: torch.Tensor,
    weight_CK: torch.Tensor,
    bias_C: torch.Tensor,
    seq_idx_BL: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for (x, weight, bias), each in its input's dtype."""
    x_BCL = _channel_last_BLC(x_BLC).transpose(1, 2)
    dout_BCL = dout_BLC.contiguous().transpose(1, 2)
    dx_BCL, dweight_CK, dbias_C, _ = _require_conv().bwd(
        x_BCL, weight_CK, bias_C, dout_BCL, seq_idx_BL, None, None, None, False, True
    )
    return (
        dx_BCL.transpose(1, 2).to(x_BLC.dtype).contiguous(),
        dweight_CK.to(weight_CK.dtype).contiguous(),
        dbias_C.to(bias_C.dtype).contiguous(),
    )


@causal_conv1d_silu_backward.register_fake
def _(dout_BLC, x_BLC, weight_CK, bias_C, seq_idx_BL):
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format)
        for t in (x_BLC, weight_CK, bias_C)
    )


def _setup_context(ctx, inputs, output):
    x_BLC, weight_CK, bias_C, seq_idx_BL = inputs
    ctx.save_for_backward(x_BLC, weight_CK, bias_C, seq_idx_BL)


def _backward(ctx, dout_BLC):
    x_BLC, weight_CK, bias_C, seq_idx_BL = ctx.saved_tensors
    dx, dweight, dbias = causal_conv1d_silu_backward(
        dout_BLC, x_BLC, weight_CK, bias_C, seq_idx_BL
    )
    return dx, dweight, dbias, None


causal_conv1d_silu.register_autograd(_backward, setup_context=_setup_context)
