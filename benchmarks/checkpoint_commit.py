#!/usr/bin/env python
"""Cost of commit-safe checkpoints: DCP's plain ``FileSystemWriter`` against
``resilience.commit.CommitWriter`` (temporary folder, per-file CRC32 recorded,
manifest, rename) on the same state dict in one process, and the load-time check
of the files against the manifest, beside a plain ``dcp.load``.

    python benchmarks/checkpoint_commit.py [--mib 512] [--files 4] [--reps 3]

Saves alternate between the two writers (other load on the machine hits both
alike); times are medians; the ratio is CommitWriter / plain. The files are in the
page cache when they are checksummed (read back right after being written), as in
a real save; a load's check reads them once more.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="state size")
    parser.add_argument("--files", type=int, default=4, help="tensors")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    numel = args.mib * (1 << 20) // 4 // args.files
    state = {f"w{i}": torch.randn(numel) for i in range(args.files)}
    root = tempfile.mkdtemp(dir=args.dir)
    times = {"plain save": [], "commit save": [], "plain load": [], "verify": []}
    try:
        for rep in range(args.reps):
            plain = os.path.join(root, f"plain-{rep}")
            t0 = time.perf_counter()
            dcp.save(state, storage_writer=dcp.FileSystemWriter(plain))
            times["plain save"].append(time.perf_counter() - t0)

            final = os.path.join(root, f"step-{rep}")
            t0 = time.perf_counter()
            dcp.save(state, storage_writer=CommitWriter(final, step=rep, states=["w"]))
            times["commit save"].append(time.perf_counter() - t0)

            target = {k: torch.empty_like(v) for k, v in state.items()}
            t0 = time.perf_counter()
            dcp.load(target, checkpoint_id=final)
            times["plain load"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            problem = check_files(final, read_manifest(final)["files"])
            times["verify"].append(time.perf_counter() - t0)
            assert problem is None, problem
            shutil.rmtree(plain)
            shutil.rmtree(final)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"state {args.mib} MiB in {args.files} tensors, {args.reps} reps, median s")
    print(f"{'':<14}{'plain':>10}{'ours':>10}{'ratio':>8}")
    print(f"{'save':<14}{med['plain save']:>10.3f}{med['commit save']:>10.3f}"
          f"{med['commit save'] / med['plain save']:>8.2f}")  # fmt: skip
    print(f"{'load+check':<14}{med['plain load']:>10.3f}"
          f"{med['plain load'] + med['verify']:>10.3f}"
          f"{(med['plain load'] + med['verify']) / med['plain load']:>8.2f}")  # fmt: skip
    print(f"CRC32 check alone: {args.mib / med['verify']:.0f} MiB/s")


if __name__ == "__main__":
    main()
