"""NemotronH's MoE (``E`` layers) on TorchTitan's MoE machinery.

Routing is ``router.py``'s (TorchTitan's router, fp32 gate). Token dispatch, load
counting and the aux-loss-free bias update are TorchTitan's too. What NemotronH changes is
the expert: relu², not gated, so two matrices per expert instead of SwiGLU's three,
plus a relu² shared expert, and, in Super and Ultra, the latent projections: the
routed experts work in a narrower width (``moe_latent_size``) so dispatch moves and
the experts multiply fewer numbers, while router and shared expert keep the full
width. Optionally, NVIDIA's sequence-level balance loss joins the gradients.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from torchtitan.models.common.linear import Linear
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
        # (``.to(dtype)``: low-precision seams return bf16 whatever the input.)
        h_TF = relu2(
            self._grouped_mm(
                A=x_TD, B_t=w1_EFD.to(dtype).transpose(-2, -1), offs=offsets_E
            ).to(dtype)
        )
        return self._grouped_mm(
            A=h_TF, B_t=w2_EDF.to(dtype).transpose(-2, -1), offs=offsets_E
        ).to(dtype)

    def _grouped_mm(
        self, *, A: torch.Tensor, B_t: torch.Tensor, offs: torch.Tensor
    ) -> torch.Tensor:
        # TorchTitan's seam (low-precision converters replace it), through our
        # custom op so fp32 experts compile too.
        return grouped_mm(A, B_t, offs)


def sequence_aux_loss(
    scores_BLE: torch.Tensor, top_k: int, coeff: float
) -> torch.Tensor:
    """The sequence-level balance loss NVIDIA trains NemotronH with (Megatron's
    ``seq_aux_loss``), summed over the rows of the batch: per row,
    ``coeff · Σ_e f_e · P_e`` with ``P_e`` the mean over the row's tokens of the
    token's sigmoid scores normalised to sum 1, and ``f_e = E/(K·L) ·`` the number
    of the row's tokens whose top-k of those scores (no correction bias) holds e."""
    E = scores_BLE.shape[-1]
    L = scores_BLE.shape[1]
    probs_BLE = scores_BLE / (scores_BLE.sum(dim=-1, keepdim=True) + 1e-20)
    with torch.no_grad():
        topk_ids_BLK = probs_BLE.topk(top_k, dim=-1).indices
        chosen_BLE = torch.zeros_like(probs_BLE).scatter_(-1, topk_ids_BLK, 1.0)
        f_BE = chosen_BLE.sum(dim=1) * (E / (top_k * L))
    P_BE = probs_BLE.mean(dim=1)
    return coeff * (f_BE * P_BE).sum()


class _AddAuxLossGradient(torch.autograd.Function):
    """Identity on the MoE output whose backward also sends ``scale`` into the aux
    loss's graph: the loss joins the gradients without entering the logged loss
    (as Megatron's ``MoEAuxLossAutoScaler``)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux_loss: torch.Tensor, scale: float):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_out, torch.full_like(aux_loss, ctx.scale), None


class NemotronHMoE(MoE):
    """TorchTitan's MoE with a relu² shared expert (same input, output added).

    With latent projections (both set, or neither), as released:
    ``fc2(experts(fc1(x))) + shared(x)`` with the router on ``x``. ``fc1`` runs
    before dispatch and ``fc2`` after combine, so under EP the all-to-all carries
    latent-width tokens; neither projection has a norm or an activation.

    ``seq_aux_loss_coeff`` > 0 adds NVIDIA's sequence-level balance loss
    (``sequence_aux_loss``, in training only) to the gradients, weighted by
    ``aux_loss_scale`` (the trainer sets 1 / rows of the global batch, so the
    loss is a mean over rows); ``last_aux_loss`` keeps its value for logging.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(MoE.Config):
        shared_experts: ReluSquaredMLP.Config | None = None
        fc1_latent_proj: Linear.Config | None = None  # hidden → latent
        fc2_latent_proj: Linear.Config | None = None  # latent → hidden
        seq_aux_loss_coeff: float = 0.0

    def __init__(self, config: Config):
        super().__init__(config)
        if (config.fc1_latent_proj is None) != (config.fc2_latent_proj is None):
            raise ValueError(
                "fc1_latent_proj and fc2_latent_proj: set both (latent MoE) or neither"
            )
        if not config.seq_aux_loss_coeff >= 0:
            raise ValueError(
                f"seq_aux_loss_coeff={config.seq_aux_loss_coeff}: must be >= 0"
            )
        self.fc1_latent_proj = None
        self.fc2_latent_proj = None
        if config.fc1_latent_proj is not None:
            self.fc1_latent_proj = config.fc1_latent_proj.build()
            self.fc2_latent_proj = config.fc2_latent_proj.build()
        self.seq_aux_loss_coeff = config.seq_aux_loss_coeff
        self.aux_loss_scale = 1.0
        self.last_aux_loss: torch.Tensor | None = None

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        # TorchTitan's MoE.forward, with the experts between the latent
        # projections when there are some, and the sequence aux loss; routing,
        # load counting and the shared expert see the full width.
        # Suffix S: the latent width (moe_latent_size), the squeezed hidden size.
        topk_scores_BLK, topk_expert_ids_BLK, scores_BLE = self.router(
            x_BLD, self.expert_bias_E
        )
        routing_map_BLE = torch.zeros_like(scores_BLE, dtype=torch.bool).scatter_(
            -1, topk_expert_ids_BLK, True
        )
        num_local_tokens_per_expert_E = routing_map_BLE.sum(dim=(0, 1))
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert_E.add_(num_local_tokens_per_expert_E)
        z_BLS = x_BLD if self.fc1_latent_proj is None else self.fc1_latent_proj(x_BLD)
        y_BLS = self.routed_experts(
            z_BLS, topk_scores_BLK, topk_expert_ids_BLK, num_local_tokens_per_expert_E
        )
        out_BLD = y_BLS if self.fc2_latent_proj is None else self.fc2_latent_proj(y_BLS)
        if self.shared_experts is not None:
            out_BLD = out_BLD + self.shared_experts(x_BLD)
        if self.training and self.seq_aux_loss_coeff > 0:
            aux_loss = sequence_aux_loss(
                scores_BLE, self.router.top_k, self.seq_aux_loss_coeff
            )
            self.last_aux_loss = aux_loss.detach()
            out_BLD = _AddAuxLossGradient.apply(out_BLD, aux_loss, self.aux_loss_scale)
        return out_BLD
