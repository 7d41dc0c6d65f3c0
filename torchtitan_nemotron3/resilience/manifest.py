"""Per-file sizes and checksums of a checkpoint, recorded at save, checked at load.

DCP has no checksums: a changed byte in a ``.distcp`` file loads silently and a
truncated one fails without naming the file. Each rank records the files it wrote
(``rank_sums_name``), hashed as DCP writes them (``commit.py``); the coordinator
merges them, adds ``.metadata``, and writes ``manifest.json`` before the folder is
committed. A load checks every listed file (the files split over the ranks) and
names the first one that differs.

Each file's entry names its checksum: ``{"size", "xxh3_64": "<16 hex>"}`` (format
2, xxHash's XXH3, several times faster than zlib's CRC32) or ``{"size", "crc32":
<int>}`` (format 1, the first saves; still read).
"""

from __future__ import annotations

import json
import os
import re
import zlib

import xxhash

from .layout import MANIFEST

_CHUNK = 16 << 20
FORMAT = 2
ALGO = "xxh3_64"
"""The checksum new saves record."""


class CheckpointCorruptError(RuntimeError):
    """A committed step's file differs from what its save recorded."""


class _Crc32:
    def __init__(self):
        self.value = 0

    def update(self, buf) -> None:
        self.value = zlib.crc32(buf, self.value)

    def digest(self) -> int:
        return self.value


class _Xxh3:
    def __init__(self):
        self.h = xxhash.xxh3_64()

    def update(self, buf) -> None:
        self.h.update(buf)

    def digest(self) -> str:
        return self.h.hexdigest()


_HASHERS = {"crc32": _Crc32, "xxh3_64": _Xxh3}
_VALID = {
    "crc32": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "xxh3_64": lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{16}", v),
}


class Summer:
    """Size and checksum of a byte stream, fed in pieces."""

    def __init__(self, algo: str = ALGO):
        self.algo = algo
        self.hasher = _HASHERS[algo]()
        self.size = 0

    def update(self, buf) -> None:
        self.hasher.update(buf)
        self.size += memoryview(buf).nbytes

    def entry(self) -> dict:
        return {"size": self.size, self.algo: self.hasher.digest()}


def file_sum(path: str, algo: str = ALGO) -> dict:
    """``{"size", algo}`` of one file, read back from disk."""
    summer = Summer(algo)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            summer.update(chunk)
    return summer.entry()


def entry_algo(entry: dict) -> str | None:
    """The checksum a manifest entry records (None: no valid one)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("size"), int):
        return None
    algos = [a for a in _HASHERS if a in entry]
    if len(algos) != 1 or not _VALID[algos[0]](entry[algos[0]]):
        return None
    return algos[0]


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


def write_rank_sums(folder: str, prefix: str, sums: dict[str, dict]) -> None:
    write_json_atomic(os.path.join(folder, rank_sums_name(prefix)), sums)


def write_manifest(
    folder: str,
    step: int | None,
    states: list[str],
    metadata_sum: dict | None = None,
    files: dict[str, dict] | None = None,
) -> dict:
    """Write ``manifest.json``: ``files`` if given (an HF step), else the ranks'
    side files merged and ``.metadata`` (``metadata_sum``, or read back)."""
    if files is None:
        files = {}
        for name in sorted(os.listdir(folder)):
            if name.startswith("__") and name.endswith("sums.json"):
                with open(os.path.join(folder, name)) as f:
                    files.update(json.load(f))
        files[".metadata"] = metadata_sum or file_sum(os.path.join(folder, ".metadata"))
    manifest = {"format": FORMAT, "step": step, "states": sorted(states), "files": files}
    write_json_atomic(os.path.join(folder, MANIFEST), manifest)
    return manifest


def read_manifest(folder: str) -> dict | None:
    """The manifest of a committed step; None if it has none (a save by plain
    TorchTitan, or by this package before checksums); raises naming the file if it
    cannot be read."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        if manifest.get("format", 1) not in (1, FORMAT):
            raise ValueError(f"format {manifest.get('format')!r} is not 1 or {FORMAT}")
        files = manifest["files"]
        if not isinstance(files, dict) or not all(
            entry_algo(v) for v in files.values()
        ):
            raise ValueError("'files' is not {name: {size, crc32 | xxh3_64}}")
        # a manifest that lists less checks less: .metadata and every data file
        unlisted = sorted(
            n for n in os.listdir(folder)
            if (n == ".metadata" or n.endswith(".distcp")) and n not in files
        )
        if unlisted:
            raise ValueError(f"'files' does not list {', '.join(unlisted[:3])}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointCorruptError(f"{path}: unreadable manifest ({e})") from None
    return manifest


def check_files(folder: str, files: dict[str, dict]) -> str | None:
    """The first problem among ``files`` (name → recorded entry), or None."""
    for name in sorted(files):
        want = files[name]
        algo = entry_algo(want)
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{path}: missing"
        size = os.path.getsize(path)
        if size != want["size"]:
            return f"{path}: {size} bytes, the save wrote {want['size']}"
        got = file_sum(path, algo)[algo]
        if got != want[algo]:
            show = (lambda v: f"{v:#010x}") if algo == "crc32" else str
            return f"{path}: {algo} {show(got)}, the save wrote {show(want[algo])}"
    return None
