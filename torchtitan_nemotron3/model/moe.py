"""NemotronH's MoE (``E`` layers) on TorchTitan's MoE machinery.

Routing is ``router.py``'s (TorchTitan's router, fp32 gate). Token dispatch, load
counting and the aux-loss-free bias update are TorchTitan's too. What NemotronH changes is
the expert: relu², not gated, so two matrices per expert instead of SwiGLU's three,
plus a relu² shared expert.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from torchtitan.models.common.moe import GroupedExperts, MoE
from torchtitan.protocols.module import Module

from ..ops.grouped_mm import grouped_mm
from .mlp import ReluSquaredMLP, relu2


class ReluSquaredGroupedExperts(GroupedExperts):
    """All routed experts as 3-D weights, one grouped GEMM per matrix, no loop.

    ``w1_EFD`` is every expert's up projection, ``w2_EDF`` its down projection; the
    names follow TorchTitan's ``GroupedExperts`` so its FSDP/EP sharding applies.
    Computes in the activations' dtype (bf16 under FSDP mixed precision, fp32 in
    parity tests) rather than forcing bf16.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(GroupedExperts.Config):
        pass

    def __init__(self, config: Config):
        Module.__init__(self)
        self.num_experts = config.num_experts
        self.w1_EFD = nn.Parameter(
            torch.empty(config.num_experts, config.hidden_dim, config.dim)
        )
        self.w2_EDF = nn.Parameter(
            torch.empty(config.num_experts, config.dim, config.hidden_dim)
        )

    def forward(
        self, x_TD: torch.Tensor, num_tokens_per_expert_E: torch.Tensor
    ) -> torch.Tensor:
        w1_EFD, w2_EDF = self.w1_EFD, self.w2_EDF
        if isinstance(w1_EFD, DTensor):
            # Dynamic token counts (EP) cannot be expressed as DTensors.
            w1_EFD, w2_EDF = w1_EFD.to_local(), w2_EDF.to_local()
        offsets_E = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
        dtype = x_TD.dtype
        h_TF = relu2(
            self._grouped_mm(A=x_TD, B_t=w1_EFD.to(dtype).transpose(-2, -1), offs=offsets_E)
        )
        return self._grouped_mm(
            A=h_TF, B_t=w2_EDF.to(dtype).transpose(-2, -1), offs=offsets_E
        )

    def _grouped_mm(
        self, *, A: torch.Tensor, B_t: torch.Tensor, offs: torch.Tensor
    ) -> torch.Tensor:
        # TorchTitan's seam (low-precision converters replace it), through our
        # custom op so fp32 experts compile too.
        return grouped_mm(A, B_t, offs)


class NemotronHMoE(MoE):
    """TorchTitan's MoE with a relu² shared expert (same input, output added)."""

    @dataclass(kw_only=True, slots=True)
    class Config(MoE.Config):
        shared_experts: ReluSquaredMLP.Config | None = None
