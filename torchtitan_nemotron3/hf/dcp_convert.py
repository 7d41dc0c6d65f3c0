"""Offline conversion between TorchTitan DCP checkpoints and hub-format directories.

A TorchTitan checkpoint (``outputs/checkpoint/step-N``) stores the model under our
names at the top level (beside ``optimizer``, ``lr_scheduler``, ... in full
checkpoints) but no architecture: the caller names it (flavor or config.json).
A LoRA run's checkpoint also holds the adapters (``<module>.lora_a.weight`` /
``lora_b.weight``) and no rank or alpha: the caller passes the run's converted
model config (``lora_model_config``) and each adapted weight is written merged,
``W + alpha/r · B A`` (``lora.merge.merge_lora``, through ``merge_hook``), what
vLLM serves.

DCP → HF streams: the shard plan is made from the DCP metadata, and each output
shard loads only its own tensors (``dcp.load`` of a partial state dict), so memory
stays near one shard. HF → DCP builds the model with ``from_pretrained`` and saves
its state dict with ``dcp.save``, i.e. exactly what TorchTitan's
``checkpoint.initial_load_path`` (without ``initial_load_in_hf``) loads. Both write
into a temporary sibling directory and rename it into place.
"""

import os
import re
from collections import defaultdict

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from torchtitan_nemotron3.model import NemotronHArgs

from .merge_hook import weight_merge
from .config import hf_config_from_args, write_hf_config
from .errors import CheckpointMismatchError
from .files import check_finite, scan_checkpoint
from .io import _build_on_meta, check_checkpoint, from_pretrained
from .naming import HUB_PREFIX, keep_fp32, ours_to_hub, packed_part, packed_parts
from .writer import (
    DEFAULT_MAX_SHARD_SIZE,
    atomic_directory,
    copy_assets,
    write_hf_checkpoint,
)

# First name component of every model tensor (everything else in a TorchTitan
# checkpoint is optimizer / scheduler / dataloader / train state).
_MODEL_ROOTS = {"tok_embeddings", "layers", "norm", "lm_head", "mtp"}


def dcp_to_hf(
    dcp_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    args: NemotronHArgs,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = False,
    assets_dir: str | os.PathLike | None = None,
    lora_model_config=None,
) -> None:
    """Write the model of a DCP checkpoint as a hub-format directory.

    ``dtype`` casts floating tensors (default: as stored; the router stays fp32).
    ``assets_dir`` supplies tokenizer / chat template / generation config files.
    ``lora_model_config``: for a LoRA run's checkpoint, the run's converted model
    config (``model_spec.model``, or ``lora.export.lora_config_for_dcp``); each
    adapted weight is merged with its adapters (in the stored dtype, computed in
    fp32, then cast) and the adapters are not written.
    Raises ``CheckpointMismatchError`` naming model tensors the checkpoint lacks
    or stores with another shape (adapters included), ``CorruptCheckpointError``
    naming a tensor holding NaN/inf (a diverged run), ``ValueError`` for a
    checkpoint holding adapters when no ``lora_model_config`` is given.
    """
    dcp_dir = os.fspath(dcp_dir)
    metadata = FileSystemReader(dcp_dir).read_metadata().state_dict_metadata
    if (
        args.num_nextn_predict_layers
        and not args.mtp_num_layers
        and any(name.startswith("mtp.") for name in metadata)
    ):
        # A run that trained MTP: export its stored block too (the depth it was
        # applied for does not change the weights).
        args = args.replace(mtp_num_layers=1)
    model, adapter = _build_on_meta(args)
    # Only the model part of the checkpoint is ours to check, not optimizer or
    # dataloader state stored beside it in a full checkpoint.
    found = {
        name: tuple(md.size)
        for name, md in metadata.items()
        if name.split(".", 1)[0] in _MODEL_ROOTS and hasattr(md, "size")
    }
    merger = weight_merge()
    scalings, meta_adapters = _lora_plan(dcp_dir, found, lora_model_config)
    meta_state = _as_stored(model.state_dict(), adapter, found)
    expected = {name: t.shape for name, t in meta_state.items()}
    expected.update({name: t.shape for name, t in meta_adapters.items()})
    check_checkpoint(expected, found, dcp_dir)

    def out_dtype(name: str) -> torch.dtype:
        if keep_fp32(name):
            return torch.float32
        stored_dtype = metadata[name].properties.dtype
        return (
            dtype
            if dtype is not None and stored_dtype.is_floating_point
            else stored_dtype
        )

    # Hub tensor → the stored tensors it is made of (a packed Mamba2 tensor: its
    # parts; in a checkpoint from before the split, the packed tensor itself).
    # A LoRA-adapted weight's group also holds its two adapters.
    groups = defaultdict(list)
    for name in meta_state:
        part = packed_part(name)
        group = groups[part[0] if part else ours_to_hub(name)]
        group.append(name)
        fqn = name.removesuffix(".weight")
        if fqn in scalings:
            group += [f"{fqn}{suffix}" for suffix in merger.parts]
    owner, hub_meta = {}, {}
    for names in groups.values():
        meta = {name: meta_state[name] for name in names if not merger.is_part(name)}
        for hub, t in adapter.to_hf(meta).items():
            owner[hub] = tuple(names)
            hub_meta[hub] = torch.empty(
                t.shape, dtype=out_dtype(names[0]), device="meta"
            )

    def fetch(names: list[str]) -> dict[str, torch.Tensor]:
        """Load the DCP tensors behind ``names`` (only those) and convert them."""
        wanted = set(names)
        groups_wanted = list(dict.fromkeys(owner[n] for n in names))
        state = {
            key: torch.empty(metadata[key].size, dtype=metadata[key].properties.dtype)
            for group in groups_wanted
            for key in group
        }
        dcp.load(state, storage_reader=FileSystemReader(dcp_dir), no_dist=True)
        out = {}
        for group in groups_wanted:
            for key in group:
                check_finite(state[key], key, dcp_dir)
            # Merge before the cast: W' = W + alpha/r·B·A in fp32, in W's dtype.
            fqns = (k.removesuffix(".weight") for k in group)
            merged = merger.merge(
                {k: state[k] for k in group},
                {f: scalings[f] for f in fqns if f in scalings},
            )
            converted = adapter.to_hf(
                {k: v.to(out_dtype(k)) for k, v in merged.items()}
            )
            for hub, tensor in converted.items():
                if hub in wanted:
                    out[hub] = tensor.contiguous()
        return out

    config_dtype = dtype or metadata["lm_head.weight"].properties.dtype
    write_hf_checkpoint(
        out_dir,
        hf_config_from_args(args, config_dtype),
        hub_meta,
        fetch,
        max_shard_size=max_shard_size,
        progress=progress,
        assets_dir=assets_dir,
    )


def _lora_plan(
    dcp_dir: str, found: dict[str, tuple], lora_model_config
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """({adapted module: alpha/rank}, the adapters' meta tensors) of
    ``lora_model_config`` (both empty without one). Raises ``ValueError`` when the
    checkpoint holds adapters and no LoRA config was given (the reverse, a LoRA
    config for a checkpoint without adapters, fails ``check_checkpoint``, which
    names the missing adapters)."""
    merger = weight_merge()
    stored = sorted(name for name in found if merger.is_part(name))
    if lora_model_config is None:
        if stored:
            modules = {name.rsplit(".", 2)[0] for name in stored}
            raise ValueError(
                f"{dcp_dir} holds LoRA adapters ({len(modules)} modules, e.g. "
                f"{stored[0]}) and no LoRA config was given to merge them: "
                "scripts/convert_checkpoint.py dcp-to-hf merges them with --config "
                "RUN_CONFIG or --lora_alpha ALPHA (lora_model_config here)"
            )
        return {}, {}
    scalings = merger.scalings(lora_model_config)
    if not scalings:
        raise ValueError("lora_model_config adapts no module (no LoRA converter)")
    with torch.device("meta"):
        state = lora_model_config.build().state_dict()
    return scalings, {k: v for k, v in state.items() if merger.is_part(k)}


def _as_stored(
    meta_state: dict[str, torch.Tensor], adapter, found: dict[str, tuple]
) -> dict[str, torch.Tensor]:
    """The model's (meta) state dict as the checkpoint stores it: a checkpoint
    written before the Mamba2 parts were split (``mixer.in_proj.weight``,
    ``mixer.conv1d.weight``/``bias``) holds each packed tensor under its hub-style
    name in place of the parts; it converts the same."""
    state = dict(meta_state)
    for hub, packed in adapter.to_hf(
        {n: t for n, t in meta_state.items() if packed_part(n) is not None}
    ).items():
        parts = packed_parts(hub)
        legacy = hub.removeprefix(HUB_PREFIX)  # layers.{i}.mixer.in_proj.weight
        if legacy in found and not any(p in found for p in parts):
            for p in parts:
                del state[p]
            state[legacy] = packed
    return state


_LEGACY_PACKED = re.compile(r"^layers\.\d+\.mixer\.(in_proj|conv1d)\.(weight|bias)$")


def check_dcp_layout(dcp_dir: str | os.PathLike) -> None:
    """Raise ``ValueError`` (one line) for a DCP checkpoint written before the
    Mamba2 ``in_proj`` / ``conv1d`` were split per part (z, x, B, C, dt) for
    tensor parallelism: DCP alone would fail on the first missing part. Such a
    checkpoint converts through the hub format, which has not changed."""
    dcp_dir = os.fspath(dcp_dir)
    names = FileSystemReader(dcp_dir).read_metadata().state_dict_metadata
    legacy = sorted(n for n in names if _LEGACY_PACKED.match(n))
    if legacy:
        raise ValueError(
            f"{dcp_dir} stores the packed Mamba2 tensors ({legacy[0]}, ... "
            f"{len(legacy)} in all) of checkpoints written before they were split "
            "per part; convert it: python scripts/convert_checkpoint.py dcp-to-hf "
            f"{dcp_dir} OUT_HF --flavor FLAVOR, then load OUT_HF with "
            "checkpoint.initial_load_in_hf, or write a new DCP checkpoint with "
            "python scripts/convert_checkpoint.py hf-to-dcp OUT_HF OUT_DCP"
        )


def hf_to_dcp(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    mtp_num_layers: int = 0,
) -> None:
    """Write a hub-format directory (or Hub repo id) as a model-only DCP checkpoint
    under our names (what ``checkpoint.initial_load_path`` loads without
    ``initial_load_in_hf``). ``dtype`` defaults to the checkpoint's; the router
    stays fp32. The MTP block is kept only with ``mtp_num_layers`` > 0 (as in
    ``from_pretrained``)."""
    model = from_pretrained(
        hf_dir, dtype=dtype, progress=progress, mtp_num_layers=mtp_num_layers
    )
    with atomic_directory(out_dir) as tmp:
        dcp.save(model.state_dict(), checkpoint_id=tmp, no_dist=True)


def add_hf_config(
    hf_dir: str | os.PathLike,
    args: NemotronHArgs,
    dtype: torch.dtype | None = None,
    assets_dir: str | os.PathLike | None = None,
) -> str:
    """Complete safetensors written without config.json (TorchTitan's
    ``checkpoint.last_save_in_hf``): check the tensors fit ``args``, copy the
    tokenizer files of ``assets_dir`` if given, then write ``config.json`` (last,
    so the directory only looks complete once it is). ``dtype`` defaults to that of
    ``lm_head.weight``. Returns the config's path."""
    stored = scan_checkpoint(hf_dir)
    model, adapter = _build_on_meta(args)
    expected = {n: t.shape for n, t in adapter.to_hf(model.state_dict()).items()}
    check_checkpoint(
        expected, {n: s.shape for n, s in stored.items()}, os.fspath(hf_dir)
    )
    if assets_dir is not None:
        copy_assets(assets_dir, hf_dir)
    return write_hf_config(hf_dir, args, dtype or stored["lm_head.weight"].dtype)


__all__ = [
    "CheckpointMismatchError",
    "add_hf_config",
    "check_dcp_layout",
    "dcp_to_hf",
    "hf_to_dcp",
]
