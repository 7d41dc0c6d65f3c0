"""NemotronH's MoE router: TorchTitan's ``TokenChoiceTopKRouter`` with an fp32 gate.

As released: logits ``gate(x)`` in fp32, ``scores = sigmoid(logits)``; experts are
*chosen* by top-k of ``scores + expert_bias_E`` (HF's ``e_score_correction_bias``,
the aux-loss-free balancing bias), group-limited when ``n_group > 1``; the *weights*
are the unbiased scores of the chosen experts, renormalised when ``norm_topk_prob``
and times ``routed_scaling_factor``.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, distribute_tensor
from torchtitan.models.common.linear import Linear
from torchtitan.models.common.moe import TokenChoiceTopKRouter

from .args import NemotronHArgs


class Float32Linear(Linear):
    """The router gate: logits always in fp32, whatever the parameter dtype.

    TorchTitan's router asks for this with ``torch.autocast(dtype=float32)``, which
    CPU autocast ignores; computing in fp32 explicitly holds on every device and
    under FSDP's bf16 parameters, and is what the released model does.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Linear.Config):
        pass

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # ``input``, as ``Linear.forward`` names it: TorchTitan's sharding configs
        # address arguments by name.
        bias = None if self.bias is None else self.bias.float()
        return F.linear(input.float(), self.weight.float(), bias)


class NemotronHRouter(TokenChoiceTopKRouter):
    """TorchTitan's router; only its debug round-robin routing is made TP-safe."""

    @dataclass(kw_only=True, slots=True)
    class Config(TokenChoiceTopKRouter.Config):
        pass

    def _debug_force_load_balance_routing(
        self, scores_BLE: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Under TP the scores are a DTensor (replicated, or sequence shards with
        EP) and TorchTitan's plain index tensor cannot gather from it: build the
        global round-robin assignment (the same on every rank) and take this
        rank's part with the scores' placements, so expert ``i`` gets the tokens
        it gets on one rank."""
        if not isinstance(scores_BLE, DTensor):
            return super()._debug_force_load_balance_routing(scores_BLE)
        B, L, _ = scores_BLE.shape
        ids_BLK = (
            torch.arange(B * L * self.top_k, device=scores_BLE.device).reshape(
                B, L, self.top_k
            )
            % self.num_experts
        )
        ids_BLK = distribute_tensor(
            ids_BLK, scores_BLE.device_mesh, scores_BLE.placements, src_data_rank=None
        )
        return ids_BLK, scores_BLE.gather(dim=-1, index=ids_BLK)


def router_config(args: NemotronHArgs, gate_init: Callable) -> NemotronHRouter.Config:
    grouped = args.n_group > 1
    return NemotronHRouter.Config(
        num_experts=args.n_routed_experts,
        gate=Float32Linear.Config(
            in_features=args.hidden_size,
            out_features=args.n_routed_experts,
            param_init={"weight": gate_init},
        ),
        num_expert_groups=args.n_group if grouped else None,
        num_limited_groups=args.topk_group if grouped else None,
        top_k=args.num_experts_per_tok,
        score_func="sigmoid",
        route_norm=args.norm_topk_prob,
        route_scale=args.routed_scaling_factor,
    )
