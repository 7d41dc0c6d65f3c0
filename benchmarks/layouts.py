#!/usr/bin/env python
"""Nemotron-3-Nano-30B on one 8-GPU node: which layout, by memory and traffic.

    python benchmarks/layouts.py                     # FSDP8, EP8, EP8+TP2 at seq 8192
    python benchmarks/layouts.py --ac full --mfu 0.3 --bw_gbps 600

Per layout and GPU: parameter / gradient / AdamW bytes, activations (estimate),
traffic per step by mesh dimension, and the time that traffic takes at an
assumed NVLink bandwidth against the compute time at an assumed MFU. A layout
the package applies today is *measured* (the dry run: the package's real
``parallelize_nemotronh`` on a meta model in a fake 8-rank world); one it refuses
at config time is computed *analytically* from the same formulas
(``torchtitan_nemotron3/estimate/``) and says so. Runs on a CPU in seconds.

Assumptions (flags): B200 dense bf16 peak 2250 TFLOP/s; NVLink 5 gives 900 GB/s
per direction per GPU, of which NCCL reaches ~80% (720 GB/s); compute at 40% MFU
by our FLOP count (model/flops.py), the target of shared/docs/performance.md.
Traffic time assumes no overlap with compute (FSDP prefetch and EP overlap hide
part of it): compare the two columns, do not add them.
"""

import argparse
import copy
import logging
import os
import sys

import torch
from torchtitan.config import ParallelismConfig, TrainingConfig

from torchtitan_nemotron3 import model_registry
from torchtitan_nemotron3.dry_run import Job, dry_run
from torchtitan_nemotron3.estimate import activations, comm, memory
from torchtitan_nemotron3.estimate.layout import Layout
from torchtitan_nemotron3.estimate.shards import analytic
from torchtitan_nemotron3.model.flops import nparams_and_flops

GiB = 2**30
LAYOUTS = {  # name -> Layout on 8 ranks
    "FSDP8": Layout(world=8),
    "EP8 + FSDP8 (dense)": Layout(world=8, ep=8),
    "EP8 + TP2 + FSDP4 (dense)": Layout(world=8, ep=8, tp=2),
}
DIMS = ("fsdp", "efsdp", "ep", "tp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flavor", default="nano-30B")
    p.add_argument("--seq_len", type=int, default=8192)
    p.add_argument("--local_batch_size", type=int, default=1)
    p.add_argument("--ac", default="selective", choices=("none", "selective", "full"))
    p.add_argument("--peak_tflops", type=float, default=2250.0, help="B200 dense bf16")
    p.add_argument("--mfu", type=float, default=0.40)
    p.add_argument(
        "--bw_gbps",
        type=float,
        default=720.0,
        help="achieved NVLink bandwidth per direction per GPU, GB/s",
    )
    return p.parse_args(argv)


def _job(a, spec, layout: Layout) -> Job:
    parallelism = ParallelismConfig(
        spmd_backend="partial_dtensor", **layout.parallelism_kwargs()
    )
    training = TrainingConfig(local_batch_size=a.local_batch_size, seq_len=a.seq_len)
    return Job(a.flavor, spec, parallelism, training, a.ac, layout.world, "layouts.py")


def _analytic(a, spec, layout: Layout):
    """(shards, memory, traffic) from shapes and the layout's rules."""
    cfg = copy.deepcopy(spec.model)
    with torch.device("meta"):
        model = cfg.build()
    shards = analytic(model, cfg.hybrid_override_pattern, layout)
    acts = activations.estimate(
        cfg,
        ac=a.ac,
        local_batch=a.local_batch_size,
        seq_len=a.seq_len,
        tp=layout.tp,
        cp=layout.cp,
        pp=layout.pp,
        ep=layout.ep,
    )
    traffic = comm.estimate(
        shards, cfg, layout, local_batch=a.local_batch_size, seq_len=a.seq_len, ac=a.ac
    )
    return shards, memory.estimate(shards, acts), traffic


def rows(a) -> list[dict]:
    spec = model_registry(a.flavor)
    with torch.device("meta"):
        _, flops = nparams_and_flops(spec.model, spec.model.build(), a.seq_len)
    out = []
    for name, layout in LAYOUTS.items():
        shards, mem, traffic = _analytic(a, spec, layout)
        source, note = "analytic", ""
        try:
            report = dry_run(_job(a, spec, layout))
        except ValueError as e:
            note = f"package refuses it today ({str(e).split(':')[0]}): analytic"
        except Exception as e:  # noqa: BLE001  (a layout mid-implementation: still a row)
            note = f"dry run failed ({type(e).__name__}: {str(e)[:80]}): analytic"
        else:
            source = "measured"
            diff = sum(report.shards.local_numel.values()) / sum(
                shards.local_numel.values()
            )
            note = f"analytic params/GPU agree to {100 * abs(diff - 1):.2f}%"
            shards, mem, traffic = report.shards, report.memory, report.traffic
        tokens = a.local_batch_size * a.seq_len // layout.tp  # per GPU per step
        out.append(
            {
                "layout": name,
                "source": source,
                "note": note,
                "mem": mem,
                "traffic": traffic,
                "comm_ms": 1e3 * traffic.total / (a.bw_gbps * 1e9),
                "compute_ms": 1e3 * tokens * flops / (a.peak_tflops * 1e12 * a.mfu),
                "tokens": tokens,
            }
        )
    return out, flops


def main(argv=None) -> list[dict]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.getLogger("torchtitan").setLevel(logging.WARNING)
    from torchtitan.tools.logging import logger

    logger.setLevel(logging.WARNING)
    a = parse_args(argv)
    table, flops = rows(a)
    print(
        f"## Layouts for {a.flavor} on 8 GPUs, seq {a.seq_len} × local batch "
        f"{a.local_batch_size}, AC {a.ac}"
    )
    print(
        f"compute at {100 * a.mfu:.0f}% MFU of {a.peak_tflops:g} TFLOP/s with "
        f"{flops / 1e9:.2f} GFLOP/token (model/flops.py); traffic at {a.bw_gbps:g} GB/s "
        "per GPU (NVLink 5, 900 GB/s/direction × ~80%); memory in GiB, traffic in "
        "GB/step/GPU (received; formulas: torchtitan_nemotron3/estimate/)\n"
    )
    head = [
        "layout",
        "source",
        "params",
        "grads",
        "AdamW",
        "FSDP bufs",
        "activ.",
        "total",
        *DIMS,
        "comm ms",
        "compute ms",
        "comm/compute",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in table:
        m, t = r["mem"], r["traffic"]
        cells = [
            r["layout"],
            r["source"],
            f"{sum(m.params.values()) / GiB:.1f}",
            f"{m.grads / GiB:.1f}",
            f"{m.optimizer / GiB:.1f}",
            f"{(m.gather + m.reduce) / GiB:.1f}",
            f"{m.activations / GiB:.1f}",
            f"{m.total / GiB:.1f}",
            *(f"{t.by_dim.get(d, 0) / 1e9:.1f}" for d in DIMS),
            f"{r['comm_ms']:.0f}",
            f"{r['compute_ms']:.0f}",
            f"{r['comm_ms'] / r['compute_ms']:.2f}",
        ]
        print("| " + " | ".join(cells) + " |")
    print()
    for r in table:
        print(
            f"- {r['layout']}: {r['source']}; {r['note']}; {r['tokens']} tokens/GPU/step"
        )
    return table


if __name__ == "__main__":
    main()
    sys.exit(0)
