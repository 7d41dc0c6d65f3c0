"""Check and size a training layout on one CPU process, without GPUs or memory.

    python -m torchtitan_nemotron3.dry_run --flavor nano-30B --ngpu 8 --ep 8 \\
        [--tp 1 --pp 1 --dp_shard -1 --dp_replicate 1] --seq_len 8192 \\
        --local_batch_size 1 --ac selective|full|none [--param_dtype bfloat16]
    python -m torchtitan_nemotron3.dry_run --config_file train_configs/nemotron3-nano-30B.toml \\
        [--ngpu 8] [--section.field VALUE ...]   (the job's overrides, as run_train.sh's)
    python -m torchtitan_nemotron3.dry_run --flavor nano-30B --ngpu 1 --ep 1 --ac full \\
        --seq_len 4096 --lora_rank 16 --base_dtype nf4 --nf4_lm_head   (QLoRA)

Why this way: it runs what training runs up to the first step (the package's
config checks, TorchTitan's ``ParallelDims`` meshes on a fake process group of
``--ngpu`` ranks, the model built on the meta device and parallelized by the
model spec's own ``parallelize_fn``), so a layout the trainer would refuse is
refused here in the same one line, and the shards it reports are the ones
training would create, for whatever TP/EP/PP the package supports when it runs.
Memory and traffic are then estimated from those shards (``estimate/``: the
formulas are in each file's docstring); activations are an estimate only.
LoRA and QLoRA jobs are sized as they run: the frozen base at its stored bytes
(bf16, NF4 for QLoRA's targets), gradients and AdamW state for the adapters only.
The fake world is rank 0's view; other ranks differ only by FSDP's uneven last
shard (the min/max line). Compile is not applied (it does not change shards).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

from .estimate.job import Job, job_from_args
from .estimate.printout import print_report
from .estimate.sharded import build_sharded

__all__ = [
    "Job",
    "Report",
    "build_sharded",
    "dry_run",
    "job_from_args",
    "main",
    "print_report",
]

GiB = 2**30
B200_GIB = 179.0  # nvidia-smi: 183,359 MiB
_BYTES = {"bfloat16": 2, "float32": 4}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config_file",
        "--config",
        dest="config",
        help="TOML job file (train_configs/*.toml); its --section.field VALUE "
        "overrides may follow",
    )
    p.add_argument("--flavor", help="debugmodel | nano-30B (default nano-30B)")
    p.add_argument("--ngpu", type=int, default=None, help="ranks (default 8)")
    for flag in ("ep", "tp", "pp", "cp", "dp_shard", "dp_replicate"):
        p.add_argument(f"--{flag}", type=int)
    p.add_argument("--seq_len", type=int)
    p.add_argument("--local_batch_size", type=int)
    p.add_argument("--global_batch_size", type=int)
    p.add_argument("--ac", choices=("none", "selective", "full"))
    p.add_argument("--param_dtype", choices=("bfloat16", "float32"))
    p.add_argument(
        "--lora_rank", type=int, help="LoRA on the default targets (alpha = 2·rank)"
    )
    p.add_argument(
        "--base_dtype", choices=("bf16", "nf4"), help="LoRA's frozen base storage"
    )
    p.add_argument(
        "--nf4_lm_head", action="store_true", default=None, help="QLoRA: lm_head in NF4"
    )
    p.add_argument(
        "--gpu_gib",
        type=float,
        default=B200_GIB,
        help=f"memory per GPU for the verdict (default {B200_GIB:g}, B200)",
    )
    a, overrides = p.parse_known_args(argv)
    if overrides and not (a.config and overrides[0].startswith("--")):
        p.error(f"unrecognized arguments: {' '.join(overrides)}")
    a.overrides = overrides
    return a


@dataclass
class Report:
    job: Job
    layout: object
    shards: object
    acts: object
    memory: object
    traffic: object
    flops_per_token: int
    seconds: float


def dry_run(job: Job) -> Report:
    """Build, parallelize and size ``job``; see the module docstring."""
    from .estimate import activations, comm, memory
    from .estimate.layout import Layout
    from .estimate.shards import measure
    from .model.flops import nparams_and_flops

    t0 = time.perf_counter()
    model, model_config, dims = build_sharded(job)
    layout = Layout.from_parallelism(job.parallelism, job.ngpu)
    types = model_config.hybrid_override_pattern
    shards = measure(model, types, job.ngpu, nf4=_nf4_block_sizes(model, model_config))
    tr = job.training
    dp = dims.dp_replicate * dims.dp_shard
    accum = 1
    if tr.global_batch_size > 0:
        accum = max(1, tr.global_batch_size // (tr.local_batch_size * dp))
    pb, cb = _BYTES[tr.mixed_precision_param], _BYTES[tr.mixed_precision_param]
    rb, mb = _BYTES[tr.mixed_precision_reduce], _BYTES[tr.dtype]
    mbs = job.parallelism.pipeline_parallel_microbatch_size
    stage = [int(i) for i in model.layers]  # this rank's PP stage (or all)
    acts = activations.estimate(
        model_config,
        ac=job.ac,
        local_batch=tr.local_batch_size,
        seq_len=tr.seq_len,
        compute_bytes=cb,
        tp=layout.tp,
        cp=layout.cp,
        pp=layout.pp,
        ep=layout.ep,
        microbatches=max(1, tr.local_batch_size // max(mbs, 1)),
        stage_layers=stage,
    )
    mem = memory.estimate(
        shards, acts, master_bytes=mb, param_bytes=pb, reduce_bytes=rb
    )
    traffic = comm.estimate(
        shards,
        model_config,
        layout,
        local_batch=tr.local_batch_size,
        seq_len=tr.seq_len,
        ac=job.ac,
        param_bytes=pb,
        reduce_bytes=rb,
        compute_bytes=cb,
        accum=accum,
        stage_layers=stage,
    )
    _, flops = nparams_and_flops(model_config, model, tr.seq_len)
    import torch.distributed as dist

    dist.destroy_process_group()
    return Report(
        job, layout, shards, acts, mem, traffic, flops, time.perf_counter() - t0
    )


def _nf4_block_sizes(model, model_config) -> dict:
    """{id(param): scaler block size} of a QLoRA job's NF4 tensors (empty
    otherwise); a tensor NF4 cannot hold is refused here, by name."""
    if getattr(model_config, "base_dtype", None) != "nf4":
        return {}
    from .estimate.shards import clean_fqn
    from .qlora.nf4 import scaler_block_size
    from .qlora.transform import nf4_targets

    sizes = {}
    for fqn, module, names in nf4_targets(model, model_config.nf4_lm_head):
        for name in names:
            p = getattr(module, name)
            local = getattr(p, "_local_tensor", p)  # FSDP-sharded: NF4 row shards
            sizes[id(p)] = getattr(local, "scaler_block_size", None) or (
                scaler_block_size(p.numel(), clean_fqn(f"{fqn}.{name}"))
            )
    return sizes


def main(argv=None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    a = parse_args(argv)
    import logging

    from torchtitan.tools.logging import logger

    logger.setLevel(logging.WARNING)  # meshes and FSDP log at INFO per unit
    try:
        job = job_from_args(a)
        report = dry_run(job)
    except ValueError as e:  # the package's one-line layout errors, ConfigError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_report(report, a.gpu_gib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
