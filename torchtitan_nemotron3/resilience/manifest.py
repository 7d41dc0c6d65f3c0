"""Per-file sizes and CRC32s of a checkpoint, recorded at save, checked at load.

DCP has no checksums: a changed byte in a ``.distcp`` file loads silently and a
truncated one fails without naming the file. Each rank records the files it wrote
(``rank_sums_name``); the coordinator merges them, adds ``.metadata``, and writes
``manifest.json`` before the folder is committed. A load checks every listed file
(the files split over the ranks) and names the first one that differs.
"""

from __future__ import annotations

import json
import os
import zlib

from .layout import MANIFEST

_CHUNK = 16 << 20


class CheckpointCorruptError(RuntimeError):
    """A committed step's file differs from what its save recorded."""


def file_sum(path: str) -> dict[str, int]:
    """``{"size", "crc32"}`` of one file."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": crc}


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rank_sums_name(prefix: str) -> str:
    """The side file where the rank whose DCP file prefix is ``prefix`` (``__3_``)
    records its files."""
    return f"{prefix}sums.json"


def write_rank_sums(folder: str, prefix: str, names: list[str]) -> None:
    sums = {name: file_sum(os.path.join(folder, name)) for name in sorted(set(names))}
    write_json_atomic(os.path.join(folder, rank_sums_name(prefix)), sums)


def write_manifest(folder: str, step: int | None, states: list[str]) -> dict:
    """Merge the ranks' side files, add ``.metadata``, write ``manifest.json``."""
    files: dict[str, dict[str, int]] = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith("__") and name.endswith("sums.json"):
            with open(os.path.join(folder, name)) as f:
                files.update(json.load(f))
    files[".metadata"] = file_sum(os.path.join(folder, ".metadata"))
    manifest = {"format": 1, "step": step, "states": sorted(states), "files": files}
    write_json_atomic(os.path.join(folder, MANIFEST), manifest)
    return manifest


def read_manifest(folder: str) -> dict | None:
    """The manifest of a committed step; None if it has none (a save by plain
    TorchTitan, a HF export); raises naming the file if it cannot be read."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int)
            and isinstance(v.get("crc32"), int)
            for v in files.values()
        ):
            raise ValueError("'files' is not {name: {size, crc32}}")
        # a manifest that lists less checks less: .metadata and every data file
        unlisted = sorted(
            n for n in os.listdir(folder)
            if (n == ".metadata" or n.endswith(".distcp")) and n not in files
        )
        if unlisted:
            raise ValueError(f"'files' does not list {', '.join(unlisted[:3])}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointCorruptError(f"{path}: unreadable manifest ({e})") from None
    return manifest


def check_files(folder: str, files: dict[str, dict[str, int]]) -> str | None:
    """The first problem among ``files`` (name → recorded sum), or None."""
    for name in sorted(files):
        want = files[name]
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{path}: missing"
        size = os.path.getsize(path)
        if size != want["size"]:
            return f"{path}: {size} bytes, the save wrote {want['size']}"
        got = file_sum(path)
        if got["crc32"] != want["crc32"]:
            return (
                f"{path}: CRC32 {got['crc32']:#010x}, the save wrote "
                f"{want['crc32']:#010x}"
            )
    return None
