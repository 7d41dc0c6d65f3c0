"""The printed report: the setup lines, the table (ms/step, tokens/s, TFLOP/s, MFU,
memory, speed-up, check) and the 8-GPU Nemotron-3-Nano-30B estimate."""

import contextlib
import datetime
import os
import platform
import statistics

import torch
from harness import RSS, Timing
from models import HF_VERSION, hf_paths

from torchtitan_nemotron3.model import build_model_config
from torchtitan_nemotron3.model.flavors import NANO_30B
from torchtitan_nemotron3.model.flops import nparams_and_flops
from torchtitan_nemotron3.model.pattern import ATTENTION, MAMBA, MOE
from torchtitan_nemotron3.ops import auto_plan, loader

# Dense bf16 tensor-core peaks (vendor spec sheets), TFLOP/s per GPU.
PEAK_BF16_TFLOPS = {
    "H100": 989.4,
    "H200": 989.4,
    "H800": 989.4,
    "B200": 2250.0,
    "GB200": 2500.0,
    "A100": 312.0,
}
NANO_COUNTS = {
    s: NANO_30B.hybrid_override_pattern.count(s) for s in (MAMBA, MOE, ATTENTION)
}
GiB = 2**30
HEADER = (
    "| config | case | impl | ms/step | tokens/s | TFLOP/s | MFU | step mem | after fwd | "
    "ours speed-up | check |"
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return (
                    f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores visible)"
                )
    return platform.processor() or "cpu"


def peak_tflops(args, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16_TFLOPS.items():
            if key in name:
                return value
    return None


def print_preamble(a, device, peak) -> None:
    """The setup (device, versions, kernels, how things are measured) and the header."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    ssd_status, conv_status = loader.ssd_kernels()[1], loader.conv_kernels()[1]
    print(f"## NemotronH fwd+bwd benchmark, {now}")
    print(
        f"device: {device_name(device)} | torch {torch.__version__} "
        f"({torch.get_num_threads()} threads) | python {platform.python_version()}"
    )
    print(
        f"dtype {str(a.dtype).removeprefix('torch.')} | batch {a.batch} x seq {a.seq_len} | "
        f"median of >= {a.reps} reps (>= {a.min_seconds:g} s, <= 50), implementations "
        f"alternating, after {a.warmup} warm-up | compile ours: {a.compile}, "
        f"transformers: {a.compile_hf} | flush denormals: {device.type == 'cpu'}"
    )
    plan = f": {auto_plan(device.type)}" if a.kernel_backend == "auto" else ""
    print(f"ours: kernel_backend={a.kernel_backend!r}{plan}")
    print(f"  {ssd_status}\n  {conv_status}")
    print(
        f"transformers {HF_VERSION}: {hf_paths()}; MoE experts "
        "implementation: per model, below"
    )
    if "nano" in a.configs:
        print(
            f"nano-proxy: hidden 2688, Mamba 64x64 state 128 groups 8, {a.experts} experts "
            f"top-6 (1856 wide, shared 3712), attention 32/2 heads x 128, vocab {a.vocab}"
        )
    print(
        "TFLOP/s = tokens/s x FLOP/token, FLOP/token = 6 x active matmul params (in/out "
        "projections, q/k/v/o, MLP, router + top-k experts + shared expert, lm_head) + "
        "6 x heads x head_dim x seq per attention layer (causal) + 3 x SSD forward "
        "(model/flops.py)"
    )
    print(
        f"MFU = TFLOP/s / {peak if peak else 'n/a (no peak for this device; --peak_tflops)'}"
        + (" (dense bf16 spec)" if peak and not a.peak_tflops else "")
    )
    print(
        "ours speed-up = their ms/step / our ms/step (> 1: ours faster); "
        "check = norm-relative output difference to ours, before timing\n"
    )
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))


def case_rows(case, note: str, timings: dict[str, Timing], peak) -> list[dict]:
    """One row per implementation timed: throughput, memory, and the speed-up of ours
    (median over reps of their time / our time in the same rep)."""
    rows = []
    base = timings.get("ours")
    for label, t in timings.items():
        tok_s = case.tokens / t.seconds
        tflops = tok_s * case.flops_per_token / 1e12
        ratio = None
        if base and label != "ours":
            ratio = statistics.median(x / y for x, y in zip(t.times, base.times))
        rows.append(
            {
                "config": case.config,
                "case": case.name,
                "impl": label,
                "ms": 1e3 * t.seconds,
                "spread": t.spread,
                "reps": len(t.times),
                "tok_s": tok_s,
                "tflops": tflops,
                "mfu": tflops / peak if peak else None,
                "peak": t.peak_bytes,
                "act": t.act_bytes,
                "ratio": ratio,
                "note": note if label != "ours" else "",
                "seconds": t.seconds,
                "tokens": case.tokens,
            }
        )
    return rows


def fmt_mem(b):
    if b is None:
        return "n/a"
    return (
        f">= {max(b, 0) / GiB:.2f} GiB (RSS)"
        if isinstance(b, RSS)
        else f"{b / GiB:.2f} GiB"
    )


def print_rows(rows):
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        cells = [
            r["config"],
            r["case"],
            r["impl"],
            f"{r['ms']:.1f} ±{100 * r['spread']:.0f}% (n={r['reps']})",
            f"{r['tok_s']:,.0f}",
            f"{r['tflops']:.3g}",
            mfu,
            fmt_mem(r["peak"]),
            fmt_mem(r["act"]),
            ratio,
            r["note"],
        ]
        print("| " + " | ".join(cells) + " |", flush=True)


def nano_estimate(rows, a, device):
    """Full Nano-30B on 8 GPUs (FSDP2) from the proxy's per-layer and model rows."""
    get = {(r["config"], r["case"], r["impl"]): r for r in rows}
    need = {
        s: get.get(("nano-proxy", f"block {s}", "ours"))
        for s in (MAMBA, MOE, ATTENTION)
    }
    if not all(need.values()):
        print(
            "\n(the 8-GPU Nano-30B estimate needs the nano-proxy M, E and * block rows)"
        )
        return
    t = {s: r["seconds"] for s, r in need.items()}
    tokens = need[MAMBA]["tokens"]
    head = get.get(("nano-proxy", "head", "ours"))
    if head:
        scale = 131072 / a.vocab
        t_head = head["seconds"] * scale
        head_src = f"head row x{scale:g} for vocab 131072" if scale != 1 else "head row"
    else:
        t_head, head_src = 0.0, "not measured: run with 'model' in --only"
    t_layers = sum(NANO_COUNTS[s] * t[s] for s in t)
    t_step = t_layers + t_head
    full = build_model_config(NANO_30B)
    with torch.device("meta"):
        meta_model = full.build()
    n_total, flops = nparams_and_flops(full, meta_model, a.seq_len)
    largest_block = max(
        sum(p.numel() for p in block.parameters())
        for block in meta_model.layers.values()
    )
    del meta_model
    comm_bytes = (
        (2 + 2 + 4) * n_total * 7 / 8
    )  # all-gather bf16 fwd+bwd, reduce-scatter fp32
    t_comm = comm_bytes / (a.bus_gbps * 1e9)
    per_gpu = tokens / t_step
    print(
        f"\n### Estimate: Nemotron-3-Nano-30B on 8 GPUs, FSDP2, from the {device.type} rows above"
    )
    print(
        f"per GPU and step: {a.batch} x {a.seq_len} = {tokens} tokens; "
        f"{NANO_COUNTS[MAMBA]} M x {1e3 * t[MAMBA]:.1f} ms + {NANO_COUNTS[MOE]} E x "
        f"{1e3 * t[MOE]:.1f} ms + {NANO_COUNTS[ATTENTION]} * x {1e3 * t[ATTENTION]:.1f} ms "
        f"+ norm/lm_head/loss {1e3 * t_head:.1f} ms ({head_src}); embedding lookup "
        "and optimizer step not included"
    )
    if a.experts != NANO_30B.n_routed_experts:
        print(
            f"  (E timed with {a.experts} experts, not 128: same FLOPs per token, less weight traffic)"
        )
    print(
        f"compute: {1e3 * t_step:.0f} ms/step -> {per_gpu:,.0f} tokens/s/GPU, "
        f"{per_gpu * flops / 1e12:.1f} TFLOP/s/GPU at {flops / 1e9:.2f} GFLOP/token"
    )
    print(
        f"FSDP2 traffic: {comm_bytes / 1e9:.0f} GB/GPU/step (bf16 all-gather fwd+bwd, fp32 "
        f"reduce-scatter of {n_total / 1e9:.2f}B params) at {a.bus_gbps:g} GB/s = "
        f"{1e3 * t_comm:.0f} ms -> at best {tokens / max(t_step, t_comm):,.0f} tokens/s/GPU "
        "with full overlap; larger local batches amortise it (expert parallelism would "
        "keep expert weights in place)"
    )
    state = 16 * n_total / 8  # fp32 params + grads + AdamW m, v; sharded over 8
    unsharded = 2 * 2 * largest_block  # two blocks' bf16 params in flight (prefetch)
    logits = tokens * 131072 * (2 + 4 + 4)  # bf16 logits, fp32 upcast, its gradient
    act = {s: r["act"] or 0 for s, r in need.items()}  # held from forward to backward
    no_ac = sum(NANO_COUNTS[s] * act[s] for s in act)
    full_ac = len(
        NANO_30B.hybrid_override_pattern
    ) * tokens * NANO_30B.hidden_size * 2 + max(r["peak"] or 0 for r in need.values())
    fixed = state + unsharded + logits
    print(
        f"memory/GPU: params+grads+AdamW in fp32, sharded over 8: {state / GiB:.1f} GiB; "
        f"2 unsharded bf16 blocks in flight {unsharded / GiB:.1f} GiB; logits/loss "
        f"{logits / GiB:.1f} GiB; activations (a block's memory after forward: "
        + ", ".join(f"{s} {act[s] / GiB:.2f}" for s in act)
        + " GiB per block) "
        f"without AC {no_ac / GiB:.1f} GiB -> total {(fixed + no_ac) / GiB:.0f} GiB; "
        f"with full AC (block inputs + one block's step) {full_ac / GiB:.1f} GiB -> "
        f"total {(fixed + full_ac) / GiB:.0f} GiB"
    )
    if device.type != "cuda":
        print(
            "  (CPU rows: times and activation sizes follow the CPU run's dtype and "
            "shapes; the method, not the numbers, carries over to GPUs)"
        )
