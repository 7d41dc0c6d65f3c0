"""Exports for serving a (Q)LoRA fine-tune with vLLM.

``export_merged``: the adapters of a checkpoint (QLoRA's hold nothing else)
merged into the bf16 HF base they were trained on (the usual QLoRA practice: not
into the dequantized NF4), ``W' = W + alpha/r · B A`` in fp32, written in bf16
(what vLLM loads) or fp32, streaming one hub file's tensors at a time. bf16
rounding can erase small deltas (``W' == W`` in bf16 where ``BA != 0``); the
share of adapted elements it erases is reported and warned about above 1%
(export fp32 then). The tokenizer, chat template and any reasoning-parser file
(``*reasoning_parser*.py``, e.g. NVIDIA's ``nano_v3_reasoning_parser.py``) of
the assets are copied.

``check_peft_for_vllm``: what vLLM's LoRA loader needs of a PEFT adapter
directory: one ``lora_alpha / r`` for every module (vLLM applies one scaling),
no DoRA / ``modules_to_save``, no routed-expert or router keys; returns the
largest module rank (``--max-lora-rank``; the fused Mamba ``in_proj`` adapter has
rank n·r).
"""

import glob
import json
import os
import shutil
from dataclasses import dataclass

import torch
from torchtitan.tools.logging import logger

from ..hf.errors import read_json
from ..hf.files import open_safetensors, read_stored, scan_checkpoint
from ..hf.naming import keep_fp32, ours_to_hub, packed_part, packed_parts
from ..hf.writer import copy_assets, write_hf_checkpoint
from .converter import lora_scalings
from .export import load_lora_adapters
from .merge import LORA_A, LORA_B

ERASED_WARN = 0.01


@dataclass
class MergeReport:
    adapted_elements: int  # elements with a non-zero LoRA delta
    erased_elements: int  # of those, left unchanged by the rounding to the export dtype

    @property
    def erased_share(self) -> float:
        return self.erased_elements / max(self.adapted_elements, 1)


def _plan(model_config, state) -> dict[str, list[tuple[int, int, str]]]:
    """hub tensor → [(row start, row end, adapted module FQN)]."""
    plan: dict[str, list] = {}
    for fqn in lora_scalings(model_config):
        part = packed_part(f"{fqn}.weight")
        if part is None:
            hub = ours_to_hub(f"{fqn}.weight")
            plan.setdefault(hub, []).append((0, state[f"{fqn}.weight"].shape[0], fqn))
            continue
        hub, row = part[0], 0
        for name in packed_parts(hub):  # "<part FQN>.weight"
            rows = state[name].shape[0]
            if name == f"{fqn}.weight":
                plan.setdefault(hub, []).append((row, row + rows, fqn))
            row += rows
    return plan


def export_merged(
    dcp_dir: str | os.PathLike,
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    model_config,
    *,
    dtype: torch.dtype = torch.bfloat16,
    assets_dir: str | os.PathLike | None = None,
) -> MergeReport:
    """Merge the adapters of the DCP checkpoint ``dcp_dir`` (a run of the LoRA
    ``model_config``) into the HF base at ``base_dir``; write ``out_dir`` (see
    the module doc). ``assets_dir`` defaults to ``base_dir``."""
    state = load_lora_adapters(dcp_dir, model_config)
    scalings = lora_scalings(model_config)
    plan = _plan(model_config, state)
    stored = scan_checkpoint(base_dir)
    missing = sorted(h for h in plan if h not in stored)
    if missing:
        raise ValueError(f"{base_dir} lacks the adapted tensors {missing[:3]}")
    out_dtype = {n: torch.float32 if keep_fp32(n) else dtype for n in stored}
    hub_meta = {
        n: torch.empty(s.shape, dtype=out_dtype[n], device="meta")
        for n, s in stored.items()
    }
    report = MergeReport(0, 0)

    def fetch(names):
        out = {}
        for name in names:
            s = stored[name]
            with open_safetensors(s.file) as f:
                w = read_stored(f, s)
            if name in plan:
                merged = w.float()
                for r0, r1, fqn in plan[name]:
                    a, b = state[f"{fqn}{LORA_A}"].float(), state[f"{fqn}{LORA_B}"].float()
                    merged[r0:r1] += scalings[fqn] * (b @ a)
                cast = merged.to(out_dtype[name])
                changed = merged != w.float()
                report.adapted_elements += int(changed.sum())
                report.erased_elements += int((changed & (cast == w.to(cast.dtype))).sum())
                out[name] = cast
            else:
                out[name] = w.to(out_dtype[name])
        return out

    hf_config = read_json(os.path.join(base_dir, "config.json"))
    name = str(dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in hf_config:
            hf_config[key] = name
    write_hf_checkpoint(out_dir, hf_config, hub_meta, fetch)
    assets = assets_dir or base_dir
    copy_assets(assets, out_dir)
    for parser in glob.glob(os.path.join(assets, "*reasoning_parser*.py")):
        shutil.copyfile(parser, os.path.join(out_dir, os.path.basename(parser)))
    if report.erased_share > ERASED_WARN and dtype != torch.float32:
        logger.warning(
            f"merged export in {name}: rounding erased {100 * report.erased_share:.1f}% "
            f"of the {report.adapted_elements:,} adapted elements' LoRA deltas "
            "(> 1%); export in float32 to keep them"
        )
    return report


def check_peft_for_vllm(adapter_dir: str | os.PathLike) -> int:
    """Raise ``ValueError`` naming what vLLM would reject or mis-scale in the PEFT
    adapter at ``adapter_dir``; return the largest module rank."""
    from safetensors import safe_open

    cfg = read_json(os.path.join(adapter_dir, "adapter_config.json"))
    problems = []
    scale = cfg["lora_alpha"] / cfg["r"]
    ranks = dict(cfg.get("rank_pattern") or {})
    alphas = dict(cfg.get("alpha_pattern") or {})
    for module in set(ranks) | set(alphas):
        r, alpha = ranks.get(module, cfg["r"]), alphas.get(module, cfg["lora_alpha"])
        if abs(alpha / r - scale) > 1e-9 * scale:
            problems.append(f"{module}: alpha/r {alpha / r:g} != {scale:g}")
    if cfg.get("use_dora"):
        problems.append("use_dora")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']}")
    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        max_rank = max(f.get_slice(k).get_shape()[0] for k in keys if ".lora_A." in k)
    bad = [k for k in keys if ".experts." in k or ".router" in k or ".gate." in k]
    if bad:
        problems.append(f"routed-expert/router keys, e.g. {bad[0]}")
    if problems:
        raise ValueError(f"{adapter_dir}: not servable by vLLM's LoRA: " + "; ".join(problems))
    return max_rank


__all__ = ["MergeReport", "check_peft_for_vllm", "export_merged"]
