#!/usr/bin/env python
"""Forward+backward throughput of our NemotronH against transformers' (and mamba-ssm's
``Mamba2`` for the mixer), per layer type and per whole model, on one device.

    python benchmarks/bench.py                        # cuda if available, else cpu
    python benchmarks/bench.py --device cuda --seq_len 4096 --batch 2 --compile
    python benchmarks/bench.py --only M,E --reps 10

What is compared, and how (``shared/docs/performance.md``):

* Cases: one block (``h + mixer(norm(h))``) of each type ``M * - E``; the whole
  ``debugmodel`` flavor; a Nano-30B-shaped proxy (real widths: hidden 2688, 128
  experts top-6, Mamba 64 heads x 64, state 128, 8 groups, pattern ``MEM*EM``;
  on CPU 16 experts and a 16K vocab unless ``--experts``/``--vocab`` say otherwise,
  which leaves the FLOPs per token of the blocks unchanged); on CUDA also the bare
  Mamba2 mixer against mamba-ssm's ``Mamba2`` module.
* Ours and transformers live in one process, get the same weights (ours copied into
  theirs) and the same inputs; outputs are checked finite and close before timing.
  Both use ``time_step_limit = (time_step_min, inf)``: transformers clamps dt there.
* Each step is forward + backward (blocks: a fixed random output gradient; models:
  cross-entropy on the logits). After ``--warmup``, the implementations alternate
  step by step (other load on the machine hits both alike) for at least ``--reps``
  steps and ``--min_seconds``; times are medians, the speed-up the median of the
  per-step ratios.
* TFLOP/s = tokens/s x training FLOPs per token from ``model/flops.py`` (formula
  printed); MFU against the device's dense bf16 peak (``--peak_tflops`` overrides).
* Memory, above what was allocated before the step (weights, inputs): "step mem" the
  step's peak (activations, gradients, temporaries), "after fwd" what the forward
  holds for the backward. CUDA: the allocator's counters; CPU: torch's
  ``MemTracker`` (counts the bytes of the tensors the step creates; the peak-RSS rise
  after ``echo 5 > /proc/self/clear_refs`` is the fallback, and understates, since
  malloc reuses freed memory without a new peak).
* CPU: ``torch.set_flush_denormal(True)`` for both implementations (the SSD's
  decays ``exp(very negative)`` otherwise hit x86 denormal slow paths).

The HF reference is built from our args with ``torchtitan_nemotron3.hf.config.
hf_config_from_args`` and gets our weights by the package's hub name map
(``torchtitan_nemotron3/hf/naming.py``).

Files: ``bench.py`` the command line; ``cases.py`` the configs and cases;
``models.py`` the implementations, built with the same weights; ``harness.py`` the
output check, timing and memory; ``report.py`` the table and the 8-GPU estimate.
"""

import argparse
import gc
import sys

import models  # isort: skip  # first: transformers before anything of ours

import report
import torch
from cases import block_case, configs, head_case, model_case
from harness import run_case

from torchtitan_nemotron3.model.pattern import ATTENTION, MAMBA, MLP, MOE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--seq_len", type=int, help="default: 4096 on cuda, 256 on cpu")
    p.add_argument("--batch", type=int, help="default: 2 on cuda, 1 on cpu")
    p.add_argument(
        "--reps", type=int, help="timed steps per case (default 10 cuda, 3 cpu)"
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--min_seconds",
        type=float,
        default=1.0,
        help="time each case at least this long (more reps, up to 50)",
    )
    p.add_argument(
        "--only",
        default="M,*,-,E,model,mixer",
        help="comma list of layer types (M * - E), 'model', 'mixer'",
    )
    p.add_argument("--configs", default="debug,nano", help="comma list: debug, nano")
    p.add_argument(
        "--experts", type=int, help="proxy routed experts (128 cuda, 16 cpu)"
    )
    p.add_argument("--vocab", type=int, help="proxy vocab (131072 cuda, 16384 cpu)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile our blocks with fullgraph=True, as TorchTitan does",
    )
    p.add_argument(
        "--compile_hf", action="store_true", help="torch.compile transformers' blocks"
    )
    p.add_argument(
        "--kernel_backend", default="auto", help="our Mamba2 ops: auto/cuda/torch"
    )
    p.add_argument(
        "--peak_tflops", type=float, help="peak for MFU (default: bf16 spec)"
    )
    p.add_argument(
        "--bus_gbps",
        type=float,
        default=350.0,
        help="NCCL bus bandwidth per GPU for the 8-GPU estimate (GB/s)",
    )
    a = p.parse_args()
    on_gpu = a.device.startswith("cuda")
    a.dtype = DTYPES[a.dtype or ("bf16" if on_gpu else "fp32")]
    a.seq_len = a.seq_len or (4096 if on_gpu else 256)
    a.batch = a.batch or (2 if on_gpu else 1)
    a.reps = a.reps or (10 if on_gpu else 3)
    a.experts = a.experts or (128 if on_gpu else 16)
    a.vocab = a.vocab or (131072 if on_gpu else 16384)
    a.only = [s.strip() for s in a.only.split(",") if s.strip()]
    a.configs = [s.strip() for s in a.configs.split(",") if s.strip()]
    return a


def main():
    a = parse_args()
    device = torch.device(a.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    if a.compile or a.compile_hf:  # one compiled frame per block: allow them all
        torch._dynamo.config.cache_size_limit = max(
            torch._dynamo.config.cache_size_limit, 256
        )
    torch.manual_seed(0)
    peak = report.peak_tflops(a, device)
    cases = configs(a)
    report.print_preamble(a, device, peak)
    rows = []

    def run(case):
        note, timings = run_case(case, a, device)
        new = report.case_rows(case, note, timings, peak)
        report.print_rows(new)
        rows.extend(new)

    for cname, margs in cases.items():
        for symbol in (MAMBA, ATTENTION, MLP, MOE):
            if symbol in a.only:
                for case in block_case(cname, margs, symbol, a, device):
                    run(case)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if "model" in a.only and cname == "nano-proxy":
            run(head_case(cname, margs, a, device))
        if "model" in a.only:
            run(model_case(cname, margs, a, device))
            gc.collect()
    print(
        "\ntransformers MoE experts implementation: "
        f"{', '.join(sorted(models.HF_EXPERTS)) or 'n/a'}"
    )
    report.nano_estimate(rows, a, device)


if __name__ == "__main__":
    sys.exit(main())
