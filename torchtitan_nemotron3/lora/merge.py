"""Fold LoRA adapters into their base weights: ``W' = W + alpha/r · B A``.

vLLM cannot serve adapters on MoE models' experts and serves merged weights fastest,
so every HF export (TorchTitan's ``last_save_in_hf``, ``lora.export.save_pretrained``,
``scripts/convert_checkpoint.py dcp-to-hf``) writes merged full weights. The merge runs on a
state dict under our names, before the hub renames: the Mamba2 ``in_proj`` parts are
merged one by one and then packed into the hub's fused ``in_proj`` like any other
part, so its rows are exactly the merged parts'.

Adapter keys (``<module>.lora_a.weight`` / ``lora_b.weight``) have no hub name; they
are dropped, which is also what an initial load from a hub checkpoint needs (the base
weights load, the adapters keep their init: B = 0).
"""

import torch
from torch.distributed.tensor import DTensor

LORA_A, LORA_B = ".lora_a.weight", ".lora_b.weight"


def is_adapter_key(name: str) -> bool:
    return name.endswith((LORA_A, LORA_B))


def delta(
    a: torch.Tensor, b: torch.Tensor, scale: float, like: torch.Tensor
) -> torch.Tensor:
    """``scale · B A`` in fp32, laid out as ``like`` (the base weight): a DTensor
    product is redistributed to the base's mesh and placements (FSDP, TP)."""
    if isinstance(b, DTensor) or isinstance(a, DTensor):
        d = (b.float() @ a.float()) * scale
        if isinstance(like, DTensor):
            return d.redistribute(like.device_mesh, like.placements)
        return d.full_tensor()
    return (b.float() @ a.float()) * scale


def merge_lora(state_dict: dict, scalings: dict[str, float]) -> dict:
    """``state_dict`` with each adapted ``<fqn>.weight`` replaced by its merged
    value (in its own dtype, computed in fp32) and the adapter keys removed.

    ``scalings`` is ``{module FQN: alpha / rank}`` (``converter.lora_scalings``).
    Raises ``ValueError`` when a base weight comes without its adapters or the
    reverse (a partial state dict would otherwise export an unmerged weight)."""
    if not scalings and not any(is_adapter_key(k) for k in state_dict):
        return state_dict
    out = {k: v for k, v in state_dict.items() if not is_adapter_key(k)}
    for fqn, scale in scalings.items():
        keys = (f"{fqn}.weight", f"{fqn}{LORA_A}", f"{fqn}{LORA_B}")
        present = [k in state_dict for k in keys]
        if not any(present):
            continue
        if not all(present):
            raise ValueError(
                f"LoRA merge of {fqn}: the state dict holds "
                f"{[k for k, p in zip(keys, present) if p]} but not "
                f"{[k for k, p in zip(keys, present) if not p]}; merge a whole "
                "model (torchtitan_nemotron3.lora.export.save_pretrained or merged_model)"
            )
        w, a, b = (state_dict[k] for k in keys)
        if w.device.type == "meta":
            continue  # shapes only (planning an export): W' has W's shape
        out[keys[0]] = (w.float() + delta(a, b, scale, w)).to(w.dtype)
    stray = sorted(
        k
        for k in state_dict
        if is_adapter_key(k) and k.rsplit(".", 2)[0] not in scalings
    )
    if stray:
        raise ValueError(
            f"LoRA adapters {stray[:3]}... have no scaling: the state dict adapter "
            "was built from a model config without LoRA"
        )
    return out
