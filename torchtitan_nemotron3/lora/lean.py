"""A frozen base stored in the compute dtype: LoRA without fp32 master weights.

TorchTitan builds every parameter in ``training.dtype`` (fp32 master weights) and
FSDP2 casts them to ``mixed_precision_param`` for compute. A LoRA run's frozen base
never gets a gradient or an update, so an fp32 copy of it buys nothing: its compute
already sees the bf16 cast. ``store_frozen_base`` re-creates every frozen parameter
in the compute dtype on the meta model, before FSDP (FSDP2 asks for one original
dtype among the *trainable* parameters of a group only, and casts frozen bf16 to
bf16 for free), so ``to_empty``, init and the checkpoint load fill bf16 storage:
Nano's base is 58.8 GiB instead of 117.6, with no gradient and no AdamW state.

Kept as built: the router gate (``Float32Linear``: fp32 logits, as released), and
every trainable parameter (the adapters: fp32 master weights and AdamW state).
"""

import torch
from torch import nn

KEEP_DTYPE = (".router.gate.",)  # fp32 routing, as released


def frozen_base_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(FQN, parameter) of the frozen base when the model also trains something
    (LoRA); empty for full fine-tuning or a fully frozen model."""
    params = list(model.named_parameters())
    if not any(p.requires_grad for _, p in params):
        return []
    return [(n, p) for n, p in params if not p.requires_grad]


def store_frozen_base(model: nn.Module, dtype: torch.dtype) -> int:
    """Re-create each frozen base parameter (see ``frozen_base_params``) in
    ``dtype`` (not the router gate); works on meta, plain and DTensor parameters,
    before FSDP. Returns how many parameters changed dtype."""
    changed = 0
    for fqn, p in frozen_base_params(model):
        if p.dtype == dtype or not p.is_floating_point():
            continue
        if any(k in f".{fqn}" for k in KEEP_DTYPE):
            continue
        owner_name, _, leaf = fqn.rpartition(".")
        owner = model.get_submodule(owner_name)
        with torch.no_grad():
            owner._parameters[leaf] = nn.Parameter(p.to(dtype), requires_grad=False)
        changed += 1
    return changed
