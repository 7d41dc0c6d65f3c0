"""The adapters alone, in PEFT's format, for transformers' NemotronH module names.

Writes ``adapter_config.json`` + ``adapter_model.safetensors`` with the keys PEFT
itself writes for transformers' ``NemotronHForCausalLM``
(``base_model.model.model.layers.{i}.mixer.q_proj.lora_A.weight``, ...: transformers
5.x names the backbone module ``model``; the hub files call it ``backbone``, and
transformers 4.x did too: ``root="backbone"``), loadable with
``peft.PeftModel.from_pretrained(NemotronHForCausalLM.from_pretrained(base), dir)``
(checked with peft 0.21.2 and transformers 5.24, ``tests/lora/test_peft_format.py``).

The Mamba2 input projection: transformers (and the hub) hold one fused ``in_proj``
(rows z | x | B | C | dt) where we hold five Linear parts, each with its own rank-r
adapter. PEFT sees only the fused matrix, so the parts' adapters are written as one
adapter of rank ``n·r`` (n adapted parts): ``lora_A`` stacks the parts' A [n·r, D],
``lora_B`` is block-diagonal [Z, n·r] (part p's B in its own rows and its own r
columns, zeros elsewhere), so ``B_fused A_fused`` is exactly the stack of the parts'
``B_p A_p``. ``rank_pattern`` / ``alpha_pattern`` give ``in_proj`` rank ``n·r`` and
alpha ``n·alpha`` so PEFT's scaling ``alpha / r`` is unchanged.

PEFT refuses LoRA on Mamba ``out_proj`` (see ``converter.PEFT_TARGET_MODULES``):
such adapters are refused here too unless asked for.
"""

import json
import os

import torch
from safetensors.torch import save_file

from ..hf.naming import HUB_PREFIX, ours_to_hub, packed_part, packed_parts
from .converter import lora_scalings
from .merge import LORA_A, LORA_B

PEFT_PREFIX = "base_model.model."


def _hf_module(hub_weight: str, root: str) -> str:
    """transformers' module name for a hub weight name (``backbone.`` → ``root.``)."""
    module = hub_weight.removesuffix(".weight")
    if module.startswith(HUB_PREFIX):
        module = f"{root}." + module.removeprefix(HUB_PREFIX)
    return module


def peft_adapters(
    state_dict: dict[str, torch.Tensor],
    model_config,
    root: str = "model",
    mamba_out_proj: bool = False,
) -> tuple[dict[str, torch.Tensor], dict]:
    """(PEFT tensors, adapter_config dict) from a LoRA model's (unsharded) state dict
    and its converted config. Raises ``ValueError`` for an adapter transformers'
    PEFT cannot hold (the router gate is not an ``nn.Linear`` there)."""
    scalings = lora_scalings(model_config)
    if not scalings:
        raise ValueError("the model config has no LoRA adapters")
    out_proj = [f for f in scalings if f.endswith(".mixer.out_proj")]
    if out_proj and not mamba_out_proj:
        raise ValueError(
            f"{len(out_proj)} Mamba out_proj adapters ({out_proj[0]}, ...): PEFT "
            "refuses LoRA on out_proj of Mamba models (transformers' CUDA path "
            "bypasses it). Use the merged export, or train with "
            "target_modules=lora.converter.PEFT_TARGET_MODULES for PEFT adapters "
            "(mamba_out_proj=True, scripts/convert_checkpoint.py --mamba_out_proj, "
            "writes them anyway, for other loaders)"
        )
    ranks = {fqn: state_dict[f"{fqn}{LORA_A}"].shape[0] for fqn in scalings}
    base_rank = max(set(ranks.values()), key=list(ranks.values()).count)
    base_scale = max(set(scalings.values()), key=list(scalings.values()).count)
    tensors, targets, rank_pattern, alpha_pattern = {}, [], {}, {}
    fused: dict[str, list[str]] = {}
    for fqn in scalings:
        part = packed_part(f"{fqn}.weight")
        if part is not None:
            fused.setdefault(part[0], []).append(fqn)
            continue
        if fqn.endswith("router.gate"):
            raise ValueError(
                f"{fqn}: transformers' NemotronH router gate is not an nn.Linear; "
                "PEFT cannot hold an adapter on it (the merged export can)"
            )
        module = _hf_module(ours_to_hub(f"{fqn}.weight"), root)
        # PEFT's scaling is alpha/r per module: a module off the common scale gets
        # the ratio folded into B, one of another rank its own rank_pattern entry.
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = state_dict[f"{fqn}{LORA_A}"]
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = state_dict[
            f"{fqn}{LORA_B}"
        ] * (scalings[fqn] / base_scale)
        if ranks[fqn] != base_rank:
            rank_pattern[module] = ranks[fqn]
            alpha_pattern[module] = base_scale * ranks[fqn]
        targets.append(module)
    for hub_weight in fused:
        module = _hf_module(hub_weight, root)
        parts = [p.removesuffix(".weight") for p in packed_parts(hub_weight)]
        rows = {p: state_dict[f"{p}.weight"].shape[0] for p in parts}
        a_blocks, b_blocks = [], []
        for p in parts:
            if p not in scalings:
                continue
            a, b = state_dict[f"{p}{LORA_A}"], state_dict[f"{p}{LORA_B}"]
            a_blocks.append(a)
            b_blocks.append(b * (scalings[p] / base_scale))
        a_fused = torch.cat(a_blocks)
        b_fused = a_fused.new_zeros(sum(rows.values()), a_fused.shape[0])
        row, col = 0, 0
        for p in parts:
            if p in scalings:
                b = b_blocks.pop(0)
                b_fused[row : row + rows[p], col : col + b.shape[1]] = b
                col += b.shape[1]
            row += rows[p]
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a_fused
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b_fused
        targets.append(module)
        leaf = module.rsplit(".", 1)[-1]
        rank_pattern[leaf] = a_fused.shape[0]
        alpha_pattern[leaf] = base_scale * a_fused.shape[0]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(base_rank),
        "lora_alpha": base_scale * base_rank,
        "target_modules": sorted(targets),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return tensors, config


def save_peft_adapters(
    model_or_state: torch.nn.Module | dict,
    out_dir: str | os.PathLike,
    model_config=None,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype | None = None,
    root: str = "model",
    mamba_out_proj: bool = False,
) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into
    ``out_dir``. Pass a LoRA model, or its state dict and ``model_config``;
    ``dtype`` casts the adapters (default: as held); ``root``: transformers'
    name of the backbone module (see the module doc); ``mamba_out_proj``: write
    Mamba ``out_proj`` adapters, which PEFT itself refuses (else a ``ValueError``)."""
    if isinstance(model_or_state, torch.nn.Module):
        model_config = model_config or model_or_state.config
        model_or_state = model_or_state.state_dict()
    tensors, config = peft_adapters(model_or_state, model_config, root, mamba_out_proj)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    config["base_model_name_or_path"] = base_model_name_or_path
    os.makedirs(out_dir, exist_ok=True)
    save_file(
        tensors,
        os.path.join(out_dir, "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
