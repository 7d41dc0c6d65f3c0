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
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .config import CONFIG_NAME
from .files import SAFETENSORS_INDEX, SAFETENSORS_SINGLE

DEFAULT_MAX_SHARD_SIZE = "5GB"

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"``, ``"500MiB"``, ``"10KB"``."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        if match is None or match.group(2).upper() not in _UNITS:
            raise ValueError(
                f"max_shard_size={size!r}: expected e.g. 5GB, 500MB or bytes"
            )
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r} must be positive")
    return value


@dataclass
class TensorGroup:
    """Hub tensors that come from one of our tensors (a 3-D expert weight gives
    E of them); a group is never split across shard files."""

    key: str
    hub_nbytes: dict[str, int]  # hub name → bytes as written

    @property
    def nbytes(self) -> int:
        return sum(self.hub_nbytes.values())


def plan_shards(
    groups: list[TensorGroup], max_shard_size: int
) -> list[list[TensorGroup]]:
    """Greedy, in order: a new shard starts when the next group would overflow the
    current one. A group larger than the limit gets a shard of its own."""
    shards: list[list[TensorGroup]] = []
    current, size = [], 0
    for group in groups:
        if current and size + group.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(group)
        size += group.nbytes
    if current:
        shards.append(current)
    return shards


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
    groups: list[TensorGroup],
    fetch: Callable[[list[TensorGroup]], dict[str, torch.Tensor]],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = False,
    extra_files: dict[str, str] | None = None,
) -> None:
    """Write ``config.json`` and the safetensors files of ``groups`` into
    ``out_dir`` atomically: ``model.safetensors`` if one shard suffices, else
    ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``.

    ``fetch(shard_groups)`` returns the hub-named CPU tensors of those groups;
    ``extra_files`` (name → text) are written too (e.g. generation_config.json).
    """
    shards = plan_shards(groups, parse_size(max_shard_size))
    if not shards:
        raise ValueError("nothing to save: the state dict is empty")
    names = (
        [SAFETENSORS_SINGLE]
        if len(shards) == 1
        else [
            f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            for i in range(1, len(shards) + 1)
        ]
    )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=sum(g.nbytes for g in groups),
            unit="B",
            unit_scale=True,
            desc="writing safetensors",
        )
    weight_map = {}
    with atomic_directory(out_dir) as tmp:
        for name, shard in zip(names, shards):
            tensors = fetch(shard)
            expected = [hub for group in shard for hub in group.hub_nbytes]
            if sorted(tensors) != sorted(expected):
                raise RuntimeError(
                    f"fetch returned {sorted(tensors)}, expected {sorted(expected)}"
                )
            _save_file({k: tensors[k] for k in expected}, os.path.join(tmp, name))
            weight_map.update(dict.fromkeys(expected, name))
            del tensors
            if bar is not None:
                bar.update(sum(g.nbytes for g in shard))
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(g.nbytes for g in groups)},
                "weight_map": dict(sorted(weight_map.items())),
            }
            with open(os.path.join(tmp, SAFETENSORS_INDEX), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
        for file_name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, file_name), "w", encoding="utf-8") as f:
                f.write(text)
        # Last: a directory without config.json is not mistaken for a checkpoint.
        config_path = os.path.join(tmp, CONFIG_NAME)
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    if bar is not None:
        bar.close()
