"""Write a hub-format checkpoint directory atomically, shard by shard.

A reader (transformers, TorchTitan, a colleague's script) decides a checkpoint is
usable by what is in the directory, so a half-written one must never sit under the
final name: everything is written into a hidden temporary sibling
(``.<name>.tmp-*``), ``config.json`` last, fsynced, then swapped into place. An
existing directory is replaced only once the new one is complete; where the OS
supports it (Linux ``renameat2(RENAME_EXCHANGE)``) the swap itself is atomic,
elsewhere two renames leave at worst a moment with no directory, never a partial
one.

Tensors are materialised one shard at a time (``fetch``), so exporting does not
need a second copy of the model in memory.
"""

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

import torch

from .config import CONFIG_NAME
from .files import SAFETENSORS_INDEX
from .hub import local_dir

DEFAULT_MAX_SHARD_SIZE = "5GB"

# What a hub checkpoint carries besides weights and config.json, copied into an
# export when the source has it, so AutoTokenizer and generate() work on the export.
ASSET_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
ASSET_DIRS = ("additional_chat_templates",)


def resolve_assets(assets_dir: str | os.PathLike) -> str:
    """A local directory for ``assets_dir``: itself, or a Hub repo id's assets."""
    patterns = [*ASSET_FILES, *(f"{d}/*" for d in ASSET_DIRS)]
    return local_dir(assets_dir, patterns, what="assets directory")


def copy_assets(assets_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Copy the tokenizer / chat template / generation config files that
    ``assets_dir`` (a directory or Hub repo id) has into ``out_dir``."""
    assets_dir = resolve_assets(assets_dir)
    for name in ASSET_FILES + ASSET_DIRS:
        src, dst = os.path.join(assets_dir, name), os.path.join(out_dir, name)
        if not os.path.exists(src) or (
            os.path.exists(dst) and os.path.samefile(src, dst)  # assets_dir is out_dir
        ):
            continue
        if os.path.isdir(src):
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copyfile(src, dst)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two directory entries (Linux); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return (
        renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
        == 0
    )


def _move_into_place(tmp: str, out_dir: str) -> None:
    if not os.path.lexists(out_dir):
        os.rename(tmp, out_dir)
    elif _exchange(tmp, out_dir):
        shutil.rmtree(tmp)  # now holds the previous checkpoint
    else:
        old = tempfile.mkdtemp(
            prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir)
        )
        os.rmdir(old)
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    _fsync_path(os.path.dirname(out_dir))


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary directory next to ``out_dir``; on normal exit it becomes
    ``out_dir`` (replacing an existing directory), on an exception it is removed
    and ``out_dir`` is untouched."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"{out_dir} exists and is not a directory")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        _fsync_path(tmp)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_file(tensors: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})
    _fsync_path(path)


def write_hf_checkpoint(
    out_dir: str | os.PathLike,
    hf_config: dict,
    hub_meta: dict[str, torch.Tensor],
    fetch: Callable[[list[str]], dict[str, torch.Tensor]],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = False,
    assets_dir: str | os.PathLike | None = None,
) -> None:
    """Write ``config.json`` and the tensors of ``hub_meta`` into ``out_dir``
    atomically: ``model.safetensors`` if one shard suffices, else
    ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``,
    split as ``huggingface_hub`` splits (in order, a new file before the limit
    would be crossed, a tensor over the limit alone).

    ``hub_meta`` gives each hub tensor's shape and dtype as written (meta tensors:
    nothing is materialised to plan); ``fetch(names)`` returns those tensors on the
    CPU, one file's worth at a time. ``assets_dir``: see ``copy_assets``.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    if not hub_meta:
        raise ValueError("nothing to save: the state dict is empty")
    if assets_dir is not None:
        assets_dir = resolve_assets(assets_dir)  # before writing gigabytes
    split = split_torch_state_dict_into_shards(hub_meta, max_shard_size=max_shard_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=split.metadata["total_size"],
            unit="B",
            unit_scale=True,
            desc="writing safetensors",
        )
    with atomic_directory(out_dir) as tmp:
        for file_name, names in split.filename_to_tensors.items():
            tensors = fetch(names)
            if sorted(tensors) != sorted(names):
                raise RuntimeError(
                    f"fetch returned {sorted(tensors)}, expected {names}"
                )
            for name in names:
                got, want = tensors[name], hub_meta[name]
                if got.dtype != want.dtype or got.shape != want.shape:
                    raise RuntimeError(
                        f"{name}: fetched {got.dtype} {tuple(got.shape)}, "
                        f"planned {want.dtype} {tuple(want.shape)}"
                    )
            _save_file({k: tensors[k] for k in names}, os.path.join(tmp, file_name))
            del tensors
            if bar is not None:
                bar.update(sum(hub_meta[n].nbytes for n in names))
        if split.is_sharded:
            index = {
                "metadata": split.metadata,
                "weight_map": dict(sorted(split.tensor_to_filename.items())),
            }
            with open(os.path.join(tmp, SAFETENSORS_INDEX), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
        if assets_dir is not None:
            copy_assets(assets_dir, tmp)
        # Last: a directory without config.json is not mistaken for a checkpoint.
        config_path = os.path.join(tmp, CONFIG_NAME)
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    if bar is not None:
        bar.close()
