#!/usr/bin/env python
"""Cost of commit-safe, checksummed checkpoints: DCP's plain ``FileSystemWriter``
(no checksum, no commit) against ``resilience.commit.CommitWriter`` (temporary
folder, per-file checksums, manifest, rename) with the checksums taken by reading
each file back after DCP wrote it (the first version: CRC32) or while DCP writes it
(the default: XXH3), on the same state dict in one process; and a load: plain
``dcp.load`` against ``dcp.load`` plus the check of every file against its
manifest (CRC32 or XXH3).

    python benchmarks/checkpoint_commit.py [--mib 256] [--files 4] [--reps 3]

Each rep runs every writer once, in a rotated order (other load on the machine
hits all alike); times are medians; ratios are to the plain writer (save) or to
the plain load. The files are in the page cache when they are read back or checked
(read right after being written), as in a real save.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp

from torchtitan_nemotron3.resilience.commit import CommitWriter
from torchtitan_nemotron3.resilience.manifest import check_files, read_manifest

WRITERS = {
    "plain DCP (no checksum)": None,
    "re-read CRC32 (before)": {"algo": "crc32", "sum_in_write": False},
    "re-read XXH3": {"algo": "xxh3_64", "sum_in_write": False},
    "in-write CRC32": {"algo": "crc32", "sum_in_write": True},
    "in-write XXH3 (default)": {"algo": "xxh3_64", "sum_in_write": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="state size")
    parser.add_argument("--files", type=int, default=4, help="tensors")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    numel = args.mib * (1 << 20) // 4 // args.files
    state = {f"w{i}": torch.randn(numel) for i in range(args.files)}
    root = tempfile.mkdtemp(dir=args.dir)
    names = list(WRITERS)
    save = {n: [] for n in names}
    load = {"plain load": [], "check CRC32": [], "check XXH3": []}
    try:
        for rep in range(args.reps):
            kept = {}
            for name in names[rep % len(names):] + names[: rep % len(names)]:
                kw = WRITERS[name]
                final = os.path.join(root, f"step-{names.index(name)}")
                t0 = time.perf_counter()
                if kw is None:
                    dcp.save(state, storage_writer=dcp.FileSystemWriter(final))
                else:
                    writer = CommitWriter(final, step=0, states=["w"], **kw)
                    dcp.save(state, storage_writer=writer)
                save[name].append(time.perf_counter() - t0)
                kept[name] = final
            target = {k: torch.empty_like(v) for k, v in state.items()}
            t0 = time.perf_counter()
            dcp.load(target, checkpoint_id=kept["in-write XXH3 (default)"])
            load["plain load"].append(time.perf_counter() - t0)
            assert all(torch.equal(target[k], state[k]) for k in state)
            for label, name in [("check CRC32", "in-write CRC32"),
                                ("check XXH3", "in-write XXH3 (default)")]:  # fmt: skip
                t0 = time.perf_counter()
                problem = check_files(kept[name], read_manifest(kept[name])["files"])
                load[label].append(time.perf_counter() - t0)
                assert problem is None, problem
            for final in kept.values():
                shutil.rmtree(final)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in (save | load).items()}
    base = med[names[0]]
    print(f"state {args.mib} MiB in {args.files} tensors, {args.reps} reps, median s")
    print(f"{'save':<26}{'s':>8}{'ratio':>8}")
    for name in names:
        print(f"{name:<26}{med[name]:>8.3f}{med[name] / base:>8.2f}")
    plain = med["plain load"]
    print(f"{'load':<26}{'s':>8}{'ratio':>8}{'check MiB/s':>13}")
    print(f"{'plain dcp.load':<26}{plain:>8.3f}{1:>8.2f}")
    for label in ("check CRC32", "check XXH3"):
        total = plain + med[label]
        print(f"{'+ ' + label:<26}{total:>8.3f}{total / plain:>8.2f}"
              f"{args.mib / med[label]:>13.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
