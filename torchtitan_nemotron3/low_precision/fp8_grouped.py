"""FP8 rowwise grouped GEMM: torchao's on GPUs, an exact-rounding emulation on CPU.

On SM89+ the experts call torchao's ``_quantize_then_scaled_grouped_mm`` with
``Float8TrainingOpConfig`` (Triton scale-and-cast kernels + ``_scaled_grouped_mm``),
neither of which has a CPU kernel. ``emulated_float8_rowwise_grouped_mm`` rounds
the same operands to e4m3 with the same power-of-two scales along the same axes
(torchao's ``amax_to_scale`` / ``to_fp8_saturated``), then multiplies the rounded
values in fp32, so CPU tests see FP8's quantization error:

* forward ``A @ B``: A per row (over K), B per (expert, column) over K;
* input grad ``dY @ Bᵀ``: dY per row (over N), B per (expert, row) over N;
* weight grad ``Aᵀ dY`` per expert: A and dY per (group, column) over the
  group's tokens (the contraction dim).

What it does not reproduce: the hardware's fast-accumulation rounding inside the
GEMM (torchao uses ``use_fast_accum=True``).
"""

import torch
from torchao.float8.float8_utils import amax_to_scale, to_fp8_saturated

from ..ops.grouped_mm import grouped_mm, grouped_mm_wgrad

FP8 = torch.float8_e4m3fn


def _rounded(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """``x`` through e4m3 with scale ``max/amax`` rounded down to a power of 2, back in fp32."""
    scale = amax_to_scale(amax, FP8, round_scales_to_power_of_2=True)
    return to_fp8_saturated(x.float() * scale, FP8).float() / scale


def _per_group_amax(x_MK: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """amax over each group's rows, per column, broadcast back to the rows: (M, K)."""
    M, K = x_MK.shape
    E = offs_E.shape[0]
    rows = torch.arange(M, device=x_MK.device)
    group_M = torch.searchsorted(offs_E, rows, right=True).clamp(max=E)  # E: past the end
    amax_GK = torch.zeros(E + 1, K, dtype=torch.float32, device=x_MK.device)
    amax_GK = amax_GK.scatter_reduce(
        0, group_M[:, None].expand(M, K), x_MK.abs().float(), "amax", include_self=True
    )
    return amax_GK[group_M]


class _EmulatedFloat8RowwiseGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A_MK, B_t_EKN, offs_E, out_dtype):
        ctx.save_for_backward(A_MK, B_t_EKN, offs_E)
        ctx.out_dtype = out_dtype
        A_q = _rounded(A_MK, A_MK.abs().amax(-1, keepdim=True))
        B_q = _rounded(B_t_EKN, B_t_EKN.abs().amax(1, keepdim=True))
        return grouped_mm(A_q, B_q, offs_E).to(out_dtype)

    @staticmethod
    def backward(ctx, dY_MN):
        A_MK, B_t_EKN, offs_E = ctx.saved_tensors
        dY_MN = dY_MN.contiguous()
        dY_q = _rounded(dY_MN, dY_MN.abs().amax(-1, keepdim=True))
        B_q = _rounded(B_t_EKN, B_t_EKN.abs().amax(2, keepdim=True))
        dA = grouped_mm(dY_q, B_q.transpose(-2, -1), offs_E).to(ctx.out_dtype)
        A_g = _rounded(A_MK, _per_group_amax(A_MK, offs_E))
        dY_g = _rounded(dY_MN, _per_group_amax(dY_MN, offs_E))
        dB_t = grouped_mm_wgrad(A_g, dY_g, offs_E).to(ctx.out_dtype)
        return dA.to(A_MK.dtype), dB_t.to(B_t_EKN.dtype), None, None


def emulated_float8_rowwise_grouped_mm(
    A_MK: torch.Tensor,
    B_t_EKN: torch.Tensor,
    offs_E: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``(M, K) x (E, K, N) -> (M, N)`` with FP8 rowwise rounding of every GEMM operand."""
    return _EmulatedFloat8RowwiseGroupedMM.apply(A_MK, B_t_EKN, offs_E, out_dtype)
