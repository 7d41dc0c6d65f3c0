"""``torch._grouped_mm`` as a custom op, so the experts compile in any dtype.

The grouped GEMM itself is torch's (CPU and CUDA kernels, fwd and bwd). What this
adds is a fake (shape) implementation that does not insist on bf16: torch's own
meta function for ``_grouped_mm`` rejects fp32, so ``torch.compile`` of an fp32
MoE (the CPU debug and parity configurations) fails, while eager fp32 works. The
op is opaque to the compiler; it is the same kernel either way.
"""

import torch


@torch.library.custom_op("nemotron3::grouped_mm", mutates_args=())
def grouped_mm(x_RD: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Rows ``offs[e-1]:offs[e]`` of ``x`` times ``w[e]``: ``(R, D) x (E, D, F) -> (R, F)``."""
    return torch._grouped_mm(x_RD, w_EDF, offs=offs_E)


@grouped_mm.register_fake
def _(x_RD, w_EDF, offs_E):
    return x_RD.new_empty(x_RD.shape[0], w_EDF.shape[-1])


@torch.library.custom_op("nemotron3::grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad(
    a_RM: torch.Tensor, b_RK: torch.Tensor, offs_E: torch.Tensor
) -> torch.Tensor:
    """Per group ``a_eᵀ @ b_e``: ``(R, M), (R, K) -> (E, M, K)``; empty groups give 0."""
    return torch._grouped_mm(a_RM.t(), b_RK, offs=offs_E)


@grouped_mm_wgrad.register_fake
def _(a_RM, b_RK, offs_E):
    return a_RM.new_empty(offs_E.shape[0], a_RM.shape[1], b_RK.shape[1])


def _setup_context(ctx, inputs, output):
    x_RD, w_EDF, offs_E = inputs
    ctx.save_for_backward(x_RD, w_EDF, offs_E)


def _backward(ctx, grad_RF):
    x_RD, w_EDF, offs_E = ctx.saved_tensors
    # The kernel needs real strides: an expanded gradient (e.g. from ``.sum()``)
    # has zero strides.
    grad_RF = grad_RF.contiguous()
    grad_x = grouped_mm(grad_RF, w_EDF.transpose(-2, -1), offs_E)
    # The weight arrives as a transposed view of an (E, F, D) parameter: compute
    # its gradient in the parameter's own layout and hand back the matching view,
    # so gradient accumulation needs no whole-weight copy.
    grad_w = grouped_mm_wgrad(grad_RF, x_RD, offs_E).transpose(-2, -1)
    return grad_x, grad_w, None


grouped_mm.register_autograd(_backward, setup_context=_setup_context)
