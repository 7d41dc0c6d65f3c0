#!/usr/bin/env python
"""BF16 vs FP8 rowwise vs MXFP8 on Nemotron-3-Nano's GEMM shapes, and whole training
steps with low precision on the Linears only, the experts only, or both.

    python benchmarks/low_precision.py gemms                 # GPU: real kernels
    python benchmarks/low_precision.py gemms --emulate --tokens 256 --reps 2   # CPU smoke
    NGPU=8 python benchmarks/low_precision.py steps --recipe mxfp8            # B200 node
    python benchmarks/low_precision.py steps --recipe mxfp8 --emulate \\
        --config train_configs/debug_model.toml --ngpu 1 --warmup 1 --steps 2  # CPU smoke

``gemms``: each shape's forward + backward (input and weight gradients), the
implementations alternating rep by rep on the same inputs, median times, and the
ratio to BF16. Dense: ``--tokens`` rows (default 8192, one seq-8192 row) through
Nano's Linears: Mamba in_proj parts 2688→4096 (z, x) and 2688→1024 (B, C),
out_proj 4096→2688, shared expert 2688→3712→2688. Grouped: the routed experts of
one EP=8 rank, 16 local experts, ``--tokens`` routed rows split evenly, up
2688→1856 and down 1856→2688. FP8 rowwise runs torchao's ``Float8Linear`` and
``_quantize_then_scaled_grouped_mm`` (SM89+); MXFP8 torchao's ``MXFP8Linear``
and the same grouped op (SM100); a recipe whose GPU is missing is skipped.
``--emulate`` (any device, slow) times torchao's emulated MXFP8 and our FP8
grouped emulation: a smoke of the script, not a measurement.

``steps``: ``train_throughput.py``'s runs (same flags, same table columns) for
``bf16``, ``linears``, ``experts`` and ``both`` with ``--recipe``, and each
variant's tokens/s over BF16's. CPU numbers mean nothing; the targets (B200:
MXFP8 ≥ 1.15× BF16 step throughput for Nano) need a GPU.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DENSE = [  # (name, in, out)
    ("in_proj z,x", 2688, 4096),
    ("in_proj B,C", 2688, 1024),
    ("out_proj", 4096, 2688),
    ("shared up", 2688, 3712),
    ("shared down", 3712, 2688),
]
GROUPED = [("experts up", 2688, 1856), ("experts down", 1856, 2688)]
RECIPES = ("bf16", "float8_rowwise", "mxfp8")


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fns: dict, reps: int, warmup: int, device) -> dict:
    """Median seconds of each fn, alternating them rep by rep."""
    times = {k: [] for k in fns}
    for i in range(warmup + reps):
        for k, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _available(recipe: str, emulate: bool) -> bool:
    from torchtitan.tools.utils import has_cuda_capability

    if recipe == "bf16" or emulate:
        return True
    return has_cuda_capability(10, 0) if recipe == "mxfp8" else has_cuda_capability(8, 9)


def _linear(recipe, d_in, d_out, emulate, device):
    import torch
    from torchtitan.models.common.linear import Linear

    from torchtitan_nemotron3.low_precision.linear import NemotronHLinearConverter

    if recipe == "bf16":
        m = torch.nn.Linear(d_in, d_out, bias=False)
    else:
        conv = NemotronHLinearConverter.Config(recipe=recipe, emulate=emulate).build()
        m = conv._new(Linear.Config(in_features=d_in, out_features=d_out)).build()
        torch.nn.init.normal_(m.weight, std=d_in**-0.5)
    return m.to(device=device, dtype=torch.bfloat16)


def _grouped_fn(recipe, emulate):
    from torchtitan_nemotron3.ops.grouped_mm import grouped_mm

    if recipe == "bf16":
        return grouped_mm
    if recipe == "float8_rowwise" and emulate:
        from torchtitan_nemotron3.low_precision.fp8_grouped import (
            emulated_float8_rowwise_grouped_mm,
        )

        return emulated_float8_rowwise_grouped_mm
    from torchao.prototype.moe_training import utils
    from torchao.prototype.moe_training.config import (
        Float8TrainingOpConfig,
        MXFP8TrainingOpConfig,
        MXFP8TrainingRecipe,
    )

    if recipe == "float8_rowwise":
        cfg = Float8TrainingOpConfig()
    else:
        name = "mxfp8_emulated_rceil" if emulate else "mxfp8_rceil"
        cfg = MXFP8TrainingOpConfig.from_recipe(MXFP8TrainingRecipe(name))
    return lambda A, B_t, offs: utils._quantize_then_scaled_grouped_mm(
        A, B_t, config=cfg, offs=offs
    )


def gemms(a) -> list[dict]:
    import torch

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    recipes = [r for r in RECIPES if _available(r, a.emulate)]
    skipped = sorted(set(RECIPES) - set(recipes))
    torch.manual_seed(0)
    rows = []

    def step(fn, x, params):
        def run():
            xi = x.detach().requires_grad_()
            fn(xi).backward(grad)
            xi.grad = None
            for p in params:
                p.grad = None

        return run

    for name, d_in, d_out in DENSE:
        x = torch.randn(a.tokens, d_in, device=device, dtype=torch.bfloat16)
        grad = torch.randn(a.tokens, d_out, device=device, dtype=torch.bfloat16)
        mods = {r: _linear(r, d_in, d_out, a.emulate, device) for r in recipes}
        fns = {r: step(m, x, list(m.parameters())) for r, m in mods.items()}
        rows.append(_row(f"dense {name} {d_in}→{d_out}", a.tokens * d_in * d_out, fns, a, device))
    E = a.experts
    per = a.tokens // E // 128 * 128 or 128  # token groups aligned for every recipe
    offs = torch.arange(1, E + 1, device=device, dtype=torch.int32) * per
    for name, d_in, d_out in GROUPED:
        x = torch.randn(per * E, d_in, device=device, dtype=torch.bfloat16)
        grad = torch.randn(per * E, d_out, device=device, dtype=torch.bfloat16)
        w = torch.randn(E, d_out, d_in, device=device, dtype=torch.bfloat16) * d_in**-0.5
        w.requires_grad_()
        fns = {
            r: step(lambda xi, f=_grouped_fn(r, a.emulate): f(xi, w.transpose(-2, -1), offs), x, [w])
            for r in recipes
        }
        rows.append(
            _row(f"grouped {name} {d_in}→{d_out} ×{E}", per * E * d_in * d_out, fns, a, device)
        )
    _print_gemms(rows, recipes, skipped, a, device)
    return rows


def _row(label, macs, fns, a, device):
    t = _time(fns, a.reps, a.warmup, device)
    return {"case": label, "tflops": {r: 6 * macs / s / 1e12 for r, s in t.items()}, "s": t}


def _print_gemms(rows, recipes, skipped, a, device):
    import torch

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"## GEMM fwd+bwd, {name}, tokens {a.tokens}, {a.reps} reps (median), bf16 in/out"
        + (", EMULATED (a smoke: times mean nothing)" if a.emulate else "")
    )
    if skipped:
        print(f"skipped (no such GPU here): {', '.join(skipped)}")
    head = ["case", *(f"{r} ms" for r in recipes), *(f"{r} TFLOP/s" for r in recipes),
            *(f"{r} / bf16" for r in recipes if r != "bf16")]  # fmt: skip
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        s = row["s"]
        cells = [row["case"], *(f"{1e3 * s[r]:.3f}" for r in recipes),
                 *(f"{row['tflops'][r]:.1f}" for r in recipes),
                 *(f"{s['bf16'] / s[r]:.2f}×" for r in recipes if r != "bf16")]  # fmt: skip
        print("| " + " | ".join(cells) + " |")


VARIANTS = {"bf16": ("bf16", "bf16"), "linears": ("R", "bf16"), "experts": ("bf16", "R"),
            "both": ("R", "R")}  # fmt: skip


def steps(a, rest: list[str]) -> list[dict]:
    import train_throughput as tt

    rows = []
    for variant, (linear, experts) in VARIANTS.items():
        linear = a.recipe if linear == "R" else linear
        experts = ("float8_rowwise" if a.recipe.startswith("float8") else a.recipe) if experts == "R" else experts
        extra = ["--low_precision.linear", linear, "--low_precision.experts", experts]
        if a.emulate:
            extra.append("--low_precision.emulate")
        args = tt.parse_args([*rest, "--out", f"{a.out}/{variant}", "--layout", a.layout, "--", *extra])
        with open(args.config, "rb") as f:
            import tomllib

            seq_len = args.seq_len or tomllib.load(f).get("training", {}).get("seq_len", 8192)
        run = tt.run_layout(args, a.layout, seq_len)
        rows.append({"variant": variant, "linear": linear, "experts": experts, **run,
                     **tt.summarize(run, args.warmup, None, None)})  # fmt: skip
    print(f"## Training steps, {a.recipe}, layout {a.layout} (tokens/s/GPU: median of TorchTitan's tps)")
    print("\n| variant | linear | experts | tokens/s/GPU | × bf16 | logged MFU (FP8 peak when quantized) | peak mem GiB |")
    print("|---|---|---|---|---|---|---|")
    base = rows[0].get("tps")
    for r in rows:
        if "tps" not in r:
            print(f"| {r['variant']} | {r['linear']} | {r['experts']} | failed: {r['error']} |")
            continue
        ratio = f"{r['tps'] / base:.3f}×" if base else "n/a"
        mfu = "n/a" if r["logged_mfu"] is None else f"{r['logged_mfu']:.1f}%"
        print(f"| {r['variant']} | {r['linear']} | {r['experts']} | {r['tps']:,.0f} | {ratio} | {mfu} | {r['mem']:.1f} |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    g = sub.add_parser("gemms")
    g.add_argument("--tokens", type=int, default=8192)
    g.add_argument("--experts", type=int, default=16, help="local experts (128 / EP 8)")
    g.add_argument("--reps", type=int, default=20)
    g.add_argument("--warmup", type=int, default=3)
    g.add_argument("--emulate", action="store_true")
    g.add_argument("--device")
    s = sub.add_parser("steps", help="more flags go to train_throughput.py")
    s.add_argument("--recipe", choices=("mxfp8", "float8_rowwise", "float8_rowwise_gw_hp"), required=True)
    s.add_argument("--layout", default="ep8")
    s.add_argument("--emulate", action="store_true")
    s.add_argument("--out", default="outputs/low_precision_steps")
    a, rest = p.parse_known_args(argv)
    if a.what == "gemms":
        if rest:
            p.error(f"unknown arguments {rest}")
        return gemms(a)
    return steps(a, rest)


if __name__ == "__main__":
    main()
