"""Exports of a LoRA model: a live model merged, a DCP checkpoint's adapters.

TorchTitan's ``last_save_in_hf`` merges through the state dict adapter on its own.
Our ``hf.save_pretrained`` writes one hub tensor at a time, so a base weight never
meets its adapters there (it refuses a LoRA model rather than export it unmerged);
these functions merge first:

* ``merged_model(model)``: the plain NemotronH model ``W + alpha/r·B·A``, sharing
  every tensor LoRA does not touch (no copy of the experts);
* ``save_pretrained(model, out_dir, ...)``: ``hf.save_pretrained`` of that model;
* ``load_lora_adapters(dcp_dir, model_config)``: the adapters alone of a LoRA DCP
  checkpoint (``<dump_folder>/checkpoint/step-N``), for ``peft.save_peft_adapters``;
* ``lora_config_for_dcp(dcp_dir, model_config, alpha)``: the LoRA config tree of
  the run that wrote a checkpoint, from its adapters' names and rank.

A DCP checkpoint is merged on its way to a hub directory by
``hf.dcp_convert.dcp_to_hf(..., lora_model_config=...)`` (streaming, one shard in
memory): ``scripts/convert_checkpoint.py dcp-to-hf``.
"""

import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torchtitan.protocols.module import Module

from ..hf import save_pretrained as hf_save_pretrained
from ..hf.config import args_from_model_config
from ..model import NemotronHModel, build_model_config
from .converter import NemotronHLoRAConverter, lora_scalings
from .merge import LORA_A, is_adapter_key, merge_lora


def merged_model(model: NemotronHModel) -> NemotronHModel:
    """The plain (no-LoRA) model whose weights are ``model``'s merged ones.

    Unadapted tensors and buffers are shared with ``model``, adapted weights are
    new tensors; same dtype and device. Raises ``ValueError`` for a sharded model."""
    scalings = lora_scalings(model.config)
    state = merge_lora(model.state_dict(), scalings)
    plain_cfg = build_model_config(
        args_from_model_config(model.config), kernel_backend=_kernel_backend(model)
    )
    with torch.device("meta"):
        plain = plain_cfg.build()
    plain.load_state_dict(state, assign=True, strict=True)
    # Non-persistent buffers (MoE token counters) are not in the state dict.
    for name, buf in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        target = plain.get_submodule(owner)
        if target._buffers.get(leaf) is not None and target._buffers[leaf].is_meta:
            target._buffers[leaf] = buf
    return plain.train(model.training)


def _kernel_backend(model: NemotronHModel) -> str:
    for _, cfg, _, _ in model.config.traverse(Module.Config, recurse=True):
        if hasattr(cfg, "kernel_backend"):
            return cfg.kernel_backend
    return "auto"


def save_pretrained(model: NemotronHModel, out_dir, **kwargs) -> None:
    """``torchtitan_nemotron3.save_pretrained`` of ``merged_model(model)`` (same
    keyword arguments): a hub directory transformers and vLLM load as they are."""
    hf_save_pretrained(merged_model(model), out_dir, **kwargs)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def read_dcp_metadata(dcp_dir: str):
    """The DCP metadata of ``dcp_dir``, its files checked first: against the
    ``manifest.json`` (sizes, checksums) a checkpoint of the commit-safe manager has,
    else only that each data file holds the byte ranges ``.metadata`` points at (a
    changed value is undetectable without the manifest: DCP has no checksums).
    One line naming the file for anything wrong."""
    from ..resilience.manifest import CheckpointCorruptError, check_files, read_manifest

    manifest = read_manifest(dcp_dir)  # names manifest.json if unreadable
    if manifest is not None:
        problem = check_files(dcp_dir, manifest["files"])
        if problem:
            raise CheckpointCorruptError(f"DCP checkpoint file changed since its save: {problem}")
    path = os.path.join(dcp_dir, ".metadata")
    try:
        metadata = FileSystemReader(dcp_dir).read_metadata()
        ends: dict[str, int] = {}
        for info in (metadata.storage_data or {}).values():
            end = int(info.offset) + int(info.length)
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), end)
        metadata.state_dict_metadata.items()
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (not a DCP checkpoint)") from None
    except Exception as e:  # noqa: BLE001 (unpickling garbage raises anything)
        raise ValueError(f"{path}: unreadable DCP metadata ({_first_line(e)})") from None
    for name, end in sorted(ends.items()):
        file = os.path.join(dcp_dir, name)
        size = os.path.getsize(file) if os.path.isfile(file) else None
        if size is None or size < end:
            have = "missing" if size is None else f"{size} bytes"
            raise ValueError(f"{file}: {have}, {path} needs {end} (truncated)")
    return metadata


def _check_stored(dcp_dir: str, names) -> None:
    stored = read_dcp_metadata(dcp_dir).state_dict_metadata
    missing = sorted(k for k in names if k not in stored)
    if missing:
        raise ValueError(
            f"{dcp_dir} lacks {len(missing)} tensors of the LoRA model, e.g. "
            f"{missing[:3]}: was it written by a run with this LoRA config?"
        )


def load_lora_adapters(dcp_dir: str | os.PathLike, model_config) -> dict:
    """The model's state dict with only the adapters read from a DCP checkpoint
    (fp32, CPU); every other tensor stays on ``meta`` (shapes only). Enough for
    ``peft.save_peft_adapters`` without loading the base."""
    dcp_dir = os.fspath(dcp_dir)
    with torch.device("meta"):
        state = model_config.build().state_dict()
    adapters = {
        k: torch.empty(v.shape, dtype=torch.float32)
        for k, v in state.items()
        if is_adapter_key(k)
    }
    _check_stored(dcp_dir, adapters)
    try:
        dcp.load(adapters, storage_reader=FileSystemReader(dcp_dir), no_dist=True)
    except Exception as e:  # noqa: BLE001 (DCP wraps the reader's error in several layers)
        raise ValueError(f"{dcp_dir}: reading the adapters failed ({_first_line(e)})") from None
    return {**state, **adapters}


def lora_config_for_dcp(dcp_dir: str | os.PathLike, model_config, alpha: float):
    """The converted (LoRA) config of the run that wrote a DCP checkpoint, for a
    run whose config function is not at hand: targets and rank are read from the
    stored adapters (TorchTitan's converter targets last FQN segments with one
    rank, so these rebuild the run's tree exactly), ``alpha`` (which the checkpoint
    does not record) is the caller's. ``model_config``: the plain model config.
    Raises ``ValueError`` for a checkpoint without adapters or with mixed ranks."""
    dcp_dir = os.fspath(dcp_dir)
    stored = read_dcp_metadata(dcp_dir).state_dict_metadata
    ranks = {
        k.removesuffix(LORA_A): md.size[0]
        for k, md in stored.items()
        if k.endswith(LORA_A) and hasattr(md, "size")
    }
    if not ranks:
        raise ValueError(f"{dcp_dir} holds no LoRA adapters (no *{LORA_A} tensors)")
    if len(set(ranks.values())) > 1:
        raise ValueError(
            f"{dcp_dir}: LoRA adapters of ranks {sorted(set(ranks.values()))}; "
            "one converter has one rank: give the run's config function instead"
        )
    targets = sorted({fqn.rsplit(".", 1)[-1] for fqn in ranks})
    converter = NemotronHLoRAConverter.Config(
        rank=next(iter(ranks.values())), alpha=alpha, target_modules=targets
    ).build()
    return converter.convert(model_config)
