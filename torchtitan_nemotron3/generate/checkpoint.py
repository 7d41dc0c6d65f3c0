"""A model to sample from, out of a hub-format directory or a TorchTitan DCP checkpoint.

A hub-format directory (``config.json`` + safetensors, e.g. an HF export) goes through
``from_pretrained``. A DCP checkpoint (``<dump_folder>/checkpoint/step-N``, a
``.metadata`` file beside the shards) stores the model under our names but no
architecture, so the caller names it (a flavor or a config.json); the model tensors
are read on this one process (``dcp.load(no_dist=True)``), optimizer state and the
rest of a full checkpoint are left on disk.
"""

import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torchtitan.protocols.module import Module

from ..hf.config import args_from_hf_config
from ..hf.hub import MODEL_FILES, local_dir
from ..hf.io import _build_on_meta, check_checkpoint, from_pretrained
from ..hf.naming import keep_fp32
from ..hf.writer import ASSET_FILES
from ..model import NemotronHArgs, flavor_args

_DCP_METADATA = ".metadata"
# First name component of every model tensor in a TorchTitan checkpoint.
_MODEL_ROOTS = {"tok_embeddings", "layers", "norm", "lm_head"}


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """A local directory for ``path``: itself, or a Hub repo id's snapshot (weights
    and tokenizer files); one-line ``FileNotFoundError`` when it is neither."""
    return local_dir(path, [*MODEL_FILES, *ASSET_FILES], what="checkpoint")


def is_dcp_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, _DCP_METADATA))


def architecture(
    path: str, flavor: str | None = None, config_json: str | None = None
) -> NemotronHArgs:
    """The architecture of a DCP checkpoint: ``flavor``, else ``config_json``, else a
    config.json inside the checkpoint directory."""
    if flavor is not None:
        return flavor_args(flavor)
    if config_json is not None:
        return args_from_hf_config(config_json)
    if os.path.isfile(os.path.join(path, "config.json")):
        return args_from_hf_config(path)
    raise ValueError(
        f"DCP checkpoint {path} records no architecture: pass --flavor NAME "
        "(e.g. debugmodel) or --config_json FILE"
    )


def load_dcp_model(
    path: str,
    args: NemotronHArgs,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    kernel_backend: str = "auto",
) -> torch.nn.Module:
    """The model tensors of a DCP checkpoint in a freshly built model (eval mode).
    ``dtype`` defaults to the stored one; the router gate stays fp32 as in
    ``from_pretrained``. Raises ``CheckpointMismatchError`` naming tensors that do
    not fit ``args``."""
    metadata = FileSystemReader(path).read_metadata().state_dict_metadata
    model, _ = _build_on_meta(args, kernel_backend)
    found = {
        name: tuple(md.size)
        for name, md in metadata.items()
        if name.split(".", 1)[0] in _MODEL_ROOTS and hasattr(md, "size")
    }
    expected = {n: t.shape for n, t in model.state_dict().items()}
    check_checkpoint(expected, found, path)
    if dtype is None:
        dtype = metadata["lm_head.weight"].properties.dtype
    model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Module):
                module._init_self_buffers()
        state = model.state_dict()
        dcp.load(state, storage_reader=FileSystemReader(path), no_dist=True)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point():
                t.data = t.data.to(torch.float32 if keep_fp32(name) else dtype)
    return model.eval()


def load_model(
    path: str,
    *,
    flavor: str | None = None,
    config_json: str | None = None,
    args: NemotronHArgs | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    kernel_backend: str = "auto",
) -> torch.nn.Module:
    """A hub-format directory (or Hub repo id) or a DCP checkpoint, as an eval model.
    A DCP checkpoint's architecture: ``flavor``, ``config_json``, else ``args`` (a
    job's), else a config.json beside it."""
    path = resolve_checkpoint(path)
    if is_dcp_checkpoint(path):
        if args is None or flavor is not None or config_json is not None:
            args = architecture(path, flavor, config_json)
        return load_dcp_model(path, args, dtype, device, kernel_backend)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"checkpoint {path} is neither a hub-format directory (config.json + "
            f"safetensors) nor a DCP checkpoint ({_DCP_METADATA})"
        )
    return from_pretrained(
        path, dtype=dtype, device=device, kernel_backend=kernel_backend
    )
