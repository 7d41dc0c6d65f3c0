#!/usr/bin/env python
"""Training throughput per layout through the real launcher, against the targets.

    NGPU=8 python benchmarks/train_throughput.py                    # Nano-30B, 3 layouts
    python benchmarks/train_throughput.py --layout ep8 --layout ep8+tp2 --balanced
    python benchmarks/train_throughput.py --config train_configs/debug_model.toml \\
        --ngpu 2 --layout fsdp --layout ep2 --warmup 1 --steps 2 --seq_len 64   # CPU smoke

For each layout it runs ``NGPU=n CONFIG_FILE=... ./run_train.sh`` with the
layout's ``--parallelism.*`` flags, ``--training.steps warmup+steps``,
``--metrics.log_freq 1`` and checkpointing off, keeps the log under ``--out``,
and reads TorchTitan's per-step line (``components/metrics.py``)::

    step:  5  loss: ...  memory: 61.23GiB(34.12%)  tps: 31,234  tflops: ...  mfu: ...%

``tps`` there is tokens per second per GPU (divided by TP×PP×CP). Reported: the
median tps over the steps after ``--warmup``, TFLOP/s and MFU *by our FLOP count*
(``model/flops.py``, printed) against the device's dense bf16 peak, TorchTitan's
own logged MFU (same FLOP count, TorchTitan's peak table), peak reserved memory,
and the ratios to the targets of ``shared/docs/performance.md``: ≥ 43,000
tokens/s/GPU (40% of B200 at seq 8192), Megatron-Bridge EP8 8×B200 MXFP8 32,768,
NeMo AutoModel EP8 8×H100 BF16 16,789. ``--balanced`` forces balanced routing
(``debug.moe_force_load_balance``) as the published anchors do.

Layout syntax: ``+``-joined terms ``fsdp[N]`` (dp_shard, default all), ``hsdpN``
(dp_replicate), ``epN``, ``tpN``, ``ppN``, ``cpN``; a bare ``fsdp`` is FSDP only.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = {  # tokens/s/GPU, shared/docs/performance.md
    "target (40% B200 MFU)": 43_000,
    "Megatron-Bridge EP8 8×B200 MXFP8": 32_768,
    "NeMo AutoModel EP8 8×H100 BF16": 16_789,
}
PEAK_BF16_TFLOPS = {
    "B200": 2250.0,
    "GB200": 2500.0,
    "H100": 989.4,
    "H200": 989.4,
    "H800": 989.4,
    "A100": 312.0,
}
_TERM = re.compile(r"^(fsdp|hsdp|ep|tp|pp|cp)(\d*)$")
_FLAG = {
    "fsdp": "data_parallel_shard_degree",
    "hsdp": "data_parallel_replicate_degree",
    "ep": "expert_parallel_degree",
    "tp": "tensor_parallel_degree",
    "pp": "pipeline_parallel_degree",
    "cp": "context_parallel_degree",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STEP = re.compile(
    r"step:\s*(\d+)\s.*?memory:\s*([0-9.]+)GiB.*?tps:\s*([0-9,]+).*?mfu:\s*([0-9.]+%|N/A)"
)
_MODEL = re.compile(r"Model \S+ (\S+) size: ([0-9,]+) total parameters")


def layout_flags(spec: str) -> list[str]:
    """``"ep8+tp2"`` -> ``--parallelism.* N`` flags (unset degrees: the file's)."""
    flags = []
    for term in spec.split("+"):
        m = _TERM.match(term.strip())
        if not m:
            raise SystemExit(f"bad layout term {term!r} in {spec!r}; see --help")
        name, degree = m.group(1), m.group(2)
        if name == "fsdp" and not degree:
            degree = "-1"
        if not degree:
            raise SystemExit(f"layout term {term!r} needs a degree, e.g. {name}2")
        flags += [f"--parallelism.{_FLAG[name]}", degree]
    if not any("expert_parallel" in f for f in flags):
        flags += ["--parallelism.expert_parallel_degree", "1"]
    return flags


def parse_log(log: str) -> tuple[dict, str | None]:
    """``({step: (memory GiB, tps, logged mfu %)}, flavor)`` from rank 0's lines."""
    steps, flavor = {}, None
    for line in _ANSI.sub("", log).splitlines():
        if m := _MODEL.search(line):
            flavor = m.group(1)
        if m := _STEP.search(line):
            mfu = None if m.group(4) == "N/A" else float(m.group(4).rstrip("%"))
            steps.setdefault(
                int(m.group(1)),
                (float(m.group(2)), float(m.group(3).replace(",", "")), mfu),
            )
    return steps, flavor


def flops_per_token(flavor: str, seq_len: int) -> float:
    import torch

    from torchtitan_nemotron3 import build_model_config, flavor_args
    from torchtitan_nemotron3.model.flops import nparams_and_flops

    cfg = build_model_config(flavor_args(flavor))
    with torch.device("meta"):
        return nparams_and_flops(cfg, cfg.build(), seq_len)[1]


def device_peak(override: float | None) -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", override
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return name, override or peak


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="train_configs/nemotron3-nano-30B.toml")
    p.add_argument("--ngpu", type=int, default=int(os.environ.get("NGPU", "8")))
    p.add_argument(
        "--layout", action="append", help="repeatable; default fsdp, ep8, ep8+tp2"
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="measured steps")
    p.add_argument("--seq_len", type=int)
    p.add_argument("--local_batch_size", type=int)
    p.add_argument("--ac", choices=("none", "selective", "full"))
    p.add_argument("--balanced", action="store_true", help="force balanced routing")
    p.add_argument(
        "--offline_data",
        action="store_true",
        help="the generated debug tokenizer and corpus (no downloads)",
    )
    p.add_argument("--peak_tflops", type=float)
    p.add_argument("--out", default="outputs/train_throughput")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument(
        "extra", nargs="*", help="more --section.field VALUE flags (after --)"
    )
    a = p.parse_args(argv)
    a.layout = a.layout or ["fsdp", "ep8", "ep8+tp2"]
    return a


def run_layout(a, spec: str, seq_len: int) -> dict:
    """One ``run_train.sh`` run; its parsed steps and where the log is."""
    out = Path(a.out) / spec.replace("+", "_")
    out.mkdir(parents=True, exist_ok=True)
    flags = [
        *layout_flags(spec),
        "--training.steps",
        str(a.warmup + a.steps),
        "--training.seq_len",
        str(seq_len),
        "--metrics.log_freq",
        "1",
        "--checkpoint.no_enable",
        "--dump_folder",
        str(out.resolve()),
    ]
    if a.local_batch_size:
        flags += ["--training.local_batch_size", str(a.local_batch_size)]
    if a.ac:
        flags += ["--activation_checkpoint.mode", a.ac]
    if a.balanced:
        flags += ["--debug.moe_force_load_balance"]
    if a.offline_data:
        flags += ["--job.debug_assets"]
    flags += a.extra
    env = {
        "OMP_NUM_THREADS": "1",
        **os.environ,
        "NGPU": str(a.ngpu),
        "CONFIG_FILE": str(Path(a.config).resolve()),
        "LOG_RANK": "0",
    }
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(ROOT / "run_train.sh"), *flags],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=a.timeout,
        check=False,
    )
    (out / "train.log").write_text(proc.stdout)
    steps, flavor = parse_log(proc.stdout)
    error = None
    if proc.returncode or not steps:
        tail = [ln for ln in _ANSI.sub("", proc.stdout).splitlines() if ln.strip()][-3:]
        error = f"rc={proc.returncode}: " + " / ".join(tail)[-300:]
    return {
        "layout": spec,
        "steps": steps,
        "flavor": flavor,
        "error": error,
        "log": out / "train.log",
        "seconds": time.perf_counter() - t0,
    }


def summarize(run: dict, warmup: int, flops: float | None, peak: float | None) -> dict:
    measured = [v for s, v in sorted(run["steps"].items()) if s > warmup]
    if not measured:
        return {}
    tps = statistics.median(v[1] for v in measured)
    logged = [v[2] for v in measured if v[2] is not None]
    tflops = tps * flops / 1e12 if flops else None
    return {
        "n": len(measured),
        "tps": tps,
        "tflops": tflops,
        "mfu": 100 * tflops / peak if tflops and peak else None,
        "logged_mfu": statistics.median(logged) if logged else None,
        "mem": max(v[0] for v in measured),
    }


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    with open(a.config, "rb") as f:
        seq_len = a.seq_len or tomllib.load(f).get("training", {}).get("seq_len", 8192)
    device, peak = device_peak(a.peak_tflops)
    runs = [run_layout(a, spec, seq_len) for spec in a.layout]
    flavor = next((r["flavor"] for r in runs if r["flavor"]), None)
    flops = flops_per_token(flavor, seq_len) if flavor else None
    print(
        f"## Training throughput: {flavor or '?'} ({a.config}), NGPU={a.ngpu}, "
        f"seq {seq_len}, {a.warmup} warm-up + {a.steps} measured steps, device {device}"
    )
    if flops:
        print(
            f"FLOP/token (ours, model/flops.py): {flops / 1e9:.2f} G = 6 × active matmul "
            "params + 6·heads·head_dim·seq per attention layer (causal) + SSD scan"
        )
    print(
        f"MFU (ours) = tokens/s/GPU × FLOP/token / {peak or 'n/a'} TFLOP/s (dense bf16); "
        "tokens/s/GPU = median of TorchTitan's per-step tps"
        + ("; routing forced balanced" if a.balanced else "; real routing")
    )
    if device == "cpu":
        print(
            "**CPU run: a smoke test of the pipeline; the absolute numbers mean nothing.**"
        )
    head = [
        "layout",
        "steps",
        "tokens/s/GPU",
        "TFLOP/s/GPU",
        "MFU (ours)",
        "MFU (logged)",
        "peak mem GiB",
        *TARGETS,
    ]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    rows = []
    for run in runs:
        s = summarize(run, a.warmup, flops, peak)
        rows.append({**run, **s})
        if not s:
            print(
                f"| {run['layout']} | failed: {run['error'] or 'no measured step'} "
                f"(log: {run['log']}) |"
            )
            continue
        fmt = lambda v, f: "n/a" if v is None else f.format(v)
        cells = [
            run["layout"],
            str(s["n"]),
            f"{s['tps']:,.0f}",
            fmt(s["tflops"], "{:.3g}"),
            fmt(s["mfu"], "{:.1f}%"),
            fmt(s["logged_mfu"], "{:.1f}%"),
            f"{s['mem']:.1f}",
            *(f"{s['tps'] / t:.2f}×" for t in TARGETS.values()),
        ]
        print("| " + " | ".join(cells) + " |")
    print(f"\nlogs: {Path(a.out).resolve()}/<layout>/train.log")
    return rows


if __name__ == "__main__":
    rows = main()
    sys.exit(0 if rows and all("tps" in r for r in rows) else 1)
