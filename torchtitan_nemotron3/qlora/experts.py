"""Routed experts with an NF4 bank: a grouped GEMM that dequantizes per call and
keeps no bf16 copy for backward.

``NF4GroupedMM`` is ``LinearNF4``'s idea for the 3-D bank: forward dequantizes
the [E·N, K] NF4 tensor (a chunk of experts at a time when asked), runs the
grouped GEMM, frees the bf16 weights and saves only the NF4 tensor; backward
dequantizes again for ``grad_x`` and gives the bank no gradient (it is frozen).
Left to autograd, every layer would keep its dequantized bank alive until
backward: 2.4 GiB per Nano layer, ~55 GiB without activation checkpointing.

``NF4ReluSquaredGroupedExperts`` is the experts module with such a bank: the
transform (``transform.py``) swaps the class of a built ``ReluSquaredGroupedExperts``
after quantizing its ``w1_EFD`` / ``w2_EDF`` in place of the bf16 weights (2-D
NF4 parameters, same names; ``expert_shape`` keeps each bank's 3-D shape).
"""

import torch

from ..model.mlp import relu2
from ..model.moe import ReluSquaredGroupedExperts
from ..ops.grouped_mm import grouped_mm
from .nf4 import all_scalers, dequantize_rows


def _bank(w, E: int, first: int, last: int, scalers, dtype) -> torch.Tensor:
    """Experts ``[first, last)`` of an NF4 bank [E·N, K] as [e, N, K] in ``dtype``."""
    rows = w.shape[0] // E
    flat = dequantize_rows(w, first * rows, last * rows, scalers)
    return flat.view(last - first, rows, w.shape[1]).to(dtype)


def _chunked_mm(x_TK, w, E: int, offs_E, chunk: int | None, transpose: bool):
    """``grouped_mm(x, bank^T or bank)`` with the bank dequantized ``chunk``
    experts at a time (all at once when ``chunk`` is None or ≥ E)."""
    scalers = all_scalers(w)
    if chunk is None or chunk >= E:
        bank = _bank(w, E, 0, E, scalers, x_TK.dtype)
        return grouped_mm(x_TK, bank.transpose(-2, -1) if transpose else bank, offs_E)
    ends = [0] + offs_E.tolist()  # token rows of expert e: [ends[e], ends[e+1])
    outs = []
    for first in range(0, E, chunk):
        last = min(first + chunk, E)
        bank = _bank(w, E, first, last, scalers, x_TK.dtype)
        x_part = x_TK[ends[first] : ends[last]]
        offs = offs_E[first:last] - ends[first]
        outs.append(
            grouped_mm(x_part, bank.transpose(-2, -1) if transpose else bank, offs)
        )
        del bank
    tail = x_TK[ends[E] :]  # rows past the last offset (padding), as grouped_mm
    if tail.shape[0]:
        outs.append(x_TK.new_zeros(tail.shape[0], outs[0].shape[-1]))
    return torch.cat(outs)


class NF4GroupedMM(torch.autograd.Function):
    """``y_TN = grouped_mm(x_TK, dequant(W)[e]^T)`` for an NF4 bank W [E·N, K]."""

    @staticmethod
    def forward(ctx, x_TK, w_nf4, num_experts: int, offs_E, chunk):
        ctx.save_for_backward(w_nf4, offs_E)
        ctx.num_experts, ctx.chunk = num_experts, chunk
        return _chunked_mm(x_TK, w_nf4, num_experts, offs_E, chunk, transpose=True)

    @staticmethod
    def backward(ctx, grad_TN):
        w_nf4, offs_E = ctx.saved_tensors
        grad_x = _chunked_mm(
            grad_TN.contiguous(), w_nf4, ctx.num_experts, offs_E, ctx.chunk,
            transpose=False,
        )
        return grad_x, None, None, None, None


def nf4_grouped_mm(x_TK, w_nf4, num_experts: int, offs_E, chunk=None):
    return NF4GroupedMM.apply(x_TK, w_nf4, num_experts, offs_E, chunk)


class NF4ReluSquaredGroupedExperts(ReluSquaredGroupedExperts):
    """``ReluSquaredGroupedExperts`` whose banks are frozen NF4 (see the module
    doc); ``dequant_chunk_experts``: experts dequantized at a time (None: all)."""

    dequant_chunk_experts: int | None = None

    def forward(self, x_TD, num_tokens_per_expert_E):
        offsets_E = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
        E, chunk = self.num_experts, self.dequant_chunk_experts
        h_TF = relu2(nf4_grouped_mm(x_TD, self.w1_EFD, E, offsets_E, chunk))
        return nf4_grouped_mm(h_TF, self.w2_EDF, E, offsets_E, chunk)
