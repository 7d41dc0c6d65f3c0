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


def router_config(args: NemotronHArgs, gate_init: Callable) -> TokenChoiceTopKRouter.Config:
    grouped = args.n_group > 1
    return TokenChoiceTopKRouter.Config(
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
