"""Which frozen tensors go to NF4, and the post-load transform that puts them there.

NF4 targets (QLoRA's): every frozen ``Linear`` weight (Mamba ``in_proj`` parts and
``out_proj``, attention q/k/v/o, dense MLP, shared expert, latent projections,
LoRA's base weights) and the routed experts' banks; ``lm_head`` only when asked
(``nf4_lm_head``). Kept as they are: the embedding, the router gate (fp32 logits)
and biases, norms, conv, ``A_log``, ``D``, ``dt_bias``, and the adapters.

It cannot be a config-tree converter: TorchTitan's LoRA builds its classes from
the config, while quantization needs the real weights, so it runs on the built,
loaded model (``quantize_base``), or tensor by tensor while loading (``load.py``).
A quantized parameter stays a frozen ``nn.Parameter`` holding an ``NF4Tensor``:
``F.linear`` on it goes through torchao's ``linear_nf4`` (no weight gradient,
dequantized again in backward); the experts get ``NF4ReluSquaredGroupedExperts``;
Mamba's packed ``in_proj`` runs its parts one GEMM each (``NF4Mamba2InProj``).
"""

import types

import torch
from torch import nn
from torchtitan.models.common.linear import Linear

from ..model.mamba2 import Mamba2InProj
from ..model.moe import ReluSquaredGroupedExperts
from ..model.router import Float32Linear
from .experts import NF4ReluSquaredGroupedExperts
from .nf4 import NF4Tensor, nf4_placeholder, quantize, require_torchao, shardable

EXPERT_WEIGHTS = ("w1_EFD", "w2_EDF")


class NF4Mamba2InProj(Mamba2InProj):
    """``Mamba2InProj`` whose parts hold NF4 weights: NF4 tensors cannot be
    concatenated into the packed GEMM, so each part runs its own (with its
    adapter, when it has one)."""

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x_BLD) for p in self._parts()], dim=-1)


def nf4_targets(model: nn.Module, lm_head: bool = False):
    """(module FQN, module, weight names) of every NF4 target (module doc) of a
    built model, in ``named_modules`` order; the adapters are never targets."""
    for fqn, m in model.named_modules():
        leaf = fqn.rsplit(".", 1)[-1]
        if isinstance(m, ReluSquaredGroupedExperts):
            yield fqn, m, EXPERT_WEIGHTS
        elif isinstance(m, Linear) and not isinstance(m, Float32Linear):
            if leaf in ("lora_a", "lora_b") or (leaf == "lm_head" and not lm_head):
                continue
            yield fqn, m, ("weight",)


def quantize_base(
    model: nn.Module,
    lm_head: bool = False,
    dequant_chunk_experts: int | None = None,
) -> int:
    """Replace each NF4 target of a built, loaded model (its weights frozen) by its
    NF4 quantization, in place; returns the number of tensors quantized. A target
    already in NF4 is left alone; a trainable one is refused by name."""
    require_torchao()
    n = 0
    for fqn, module, names in list(nf4_targets(model, lm_head)):
        for name in names:
            p = getattr(module, name)
            if isinstance(p, NF4Tensor):
                continue
            if p.requires_grad:
                raise ValueError(
                    f"NF4: {fqn}.{name} is trainable; only a frozen base (LoRA) "
                    "can be quantized"
                )
            q = quantize(p.data, f"{fqn}.{name}")
            module._parameters[name] = nn.Parameter(q, requires_grad=False)
            del p
            n += 1
        mark_nf4(module, dequant_chunk_experts)
    for m in model.modules():
        if type(m) is Mamba2InProj and any(
            isinstance(p.weight, NF4Tensor) for p in m._parts()
        ):
            m.__class__ = NF4Mamba2InProj
    return n


def mark_nf4(module: nn.Module, dequant_chunk_experts: int | None = None) -> None:
    """Give an experts module whose banks are NF4 the NF4 forward."""
    if isinstance(module, ReluSquaredGroupedExperts) and isinstance(
        module.w1_EFD, NF4Tensor
    ):
        module.__class__ = NF4ReluSquaredGroupedExperts
        module.dequant_chunk_experts = dequant_chunk_experts


def is_nf4(p: torch.Tensor) -> bool:
    """An NF4 tensor, or a DTensor of NF4 shards (FSDP-sharded QLoRA base)."""
    return isinstance(getattr(p, "_local_tensor", p), NF4Tensor)


def nf4_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The model's NF4 parameters (FSDP2 must ignore them on one rank)."""
    return [p for p in model.parameters() if isinstance(p, NF4Tensor)]


def nf4_replicated(model: nn.Module, shards: int) -> list[nn.Parameter]:
    """The NF4 parameters FSDP2 must leave whole on each rank (``ignored_params``)
    when it shards over ``shards`` ranks: all of them on one rank (torch 2.13's
    FSDP2 skips NF4's all-gather hook at world size 1 and fails), else those
    whose rows, 64-blocks or scaler blocks do not split evenly (``nf4.shardable``;
    an NF4 tensor quantized before ``prepare_nf4`` keeps its own scaler block)."""
    params = nf4_parameters(model)
    if shards <= 1:
        return params
    return [
        p
        for p in params
        if not shardable(tuple(p.shape), shards)
        or p.quantization_factor.numel() % shards
    ]


def _init_all_but_nf4(self) -> None:
    """``_init_self_parameters`` of a module holding NF4 placeholders: its other
    parameters get their initialisers; the NF4 ones are filled later
    (``load.fill_nf4_base``)."""
    if self._param_init is None:
        return
    for name, p in self.named_parameters(recurse=False):
        if not is_nf4(p):
            self._init_param(name, p)


def prepare_nf4(
    model: nn.Module,
    lm_head: bool = False,
    dequant_chunk_experts: int | None = None,
    shards: int = 1,
) -> list[nn.Parameter]:
    """On the meta model, before FSDP (the trainer's order): each NF4 target
    becomes an NF4 placeholder of its shape and block size (``to_empty``
    allocates 4-bit storage only, init skips it); returns the placeholders,
    which ``load.fill_nf4_base`` fills after init. ``shards``: the FSDP degree;
    a target FSDP can shard that way (``nf4.shardable``) gets a scaler block
    that divides into whole blocks per shard, the others stay replicated
    (``nf4_replicated``: FSDP's ignored parameters)."""
    require_torchao()
    placeholders = []
    for fqn, module, names in list(nf4_targets(model, lm_head)):
        for name in names:
            p = getattr(module, name)
            if not p.is_meta:
                raise ValueError(f"NF4: prepare_nf4 wants a meta model ({fqn}.{name})")
            split = shards if shardable(tuple(p.shape), shards) else 1
            q = nf4_placeholder(tuple(p.shape), f"{fqn}.{name}", shards=split)
            module._parameters[name] = nn.Parameter(q, requires_grad=False)
            module.__dict__.setdefault("nf4_shapes", {})[name] = tuple(p.shape)
            placeholders.append(module._parameters[name])
        module._init_self_parameters = types.MethodType(_init_all_but_nf4, module)
        mark_nf4(module, dequant_chunk_experts)
    for m in model.modules():
        if type(m) is Mamba2InProj and any(
            isinstance(p.weight, NF4Tensor) for p in m._parts()
        ):
            m.__class__ = NF4Mamba2InProj
    return placeholders
