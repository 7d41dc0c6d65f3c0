"""``torch._grouped_mm`` as a custom op, so the experts compile in any dtype.

The grouped GEMM itself is torch's (CPU and CUDA kernels, fwd and bwd). What this
adds is a fake (shape) implementation that does not insist on bf16: torch's own
meta function for ``_grouped_mm`` rejects fp32, so ``torch.compile`` of an fp32
MoE (the CPU debug and parity configurations) fails, while eager fp32 works. The
op is opaque to the compiler; it is the same kernel either way.
"""

import torch


@torch.library.custom_op("nemotron3::grouped_mm", mutates_args=())
def grouped_mm(x_TD: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Rows ``offs[e-1]:offs[e]`` of ``x`` times ``w[e]``: ``(T, D) x (E, D, F) -> (T, F)``."""
    return torch._grouped_mm(x_TD, w_EDF, offs=offs_E)


@grouped_mm.register_fake
def _(x_TD, w_EDF, offs_E):
    return x_TD.new_empty(x_TD.shape[0], w_EDF.shape[-1])


@torch.library.custom_op("nemotron3::grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad(
    a_TF: torch.Tensor, b_TD: torch.Tensor, offs_E: torch.Tensor
) -> torch.Tensor:
    """Per group ``a_eᵀ @ b_e``: ``(T, F), (T, D) -> (E, F, D)``; empty groups give 0."""
    return torch._grouped_mm(a_TF.t(), b_TD, offs=offs_E)


@grouped_mm_wgrad.register_fake
def _(a_TF, b_TD, offs_E):
    return a_TF.new_empty(offs_E.shape[0], a_TF.shape[1], b_TD.shape[1])


def _setup_context(ctx, inputs, output):
    x_TD, w_EDF, offs_E = inputs
    ctx.save_for_backward(x_TD, w_EDF, offs_E)


def _backward(ctx, grad_TF):
    x_TD, w_EDF, offs_E = ctx.saved_tensors
    # The kernel needs real strides: an expanded gradient (e.g. from ``.sum()``)
    # has zero strides.
    grad_TF = grad_TF.contiguous()
    grad_x = grouped_mm(grad_TF, w_EDF.transpose(-2, -1), offs_E)
    # The weight arrives as a transposed view of an (E, F, D) parameter: compute
    # its gradient in the parameter's own layout and hand back the matching view,
    # so gradient accumulation needs no whole-weight copy.
    grad_w = grouped_mm_wgrad(grad_TF, x_TD, offs_E).transpose(-2, -1)
    return grad_x, grad_w, None


grouped_mm.register_autograd(_backward, setup_context=_setup_context)
