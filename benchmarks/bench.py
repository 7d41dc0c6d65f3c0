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
hf_config_from_args``; its in-memory parameter names are mapped to ours here.
"""

import argparse
import contextlib
import datetime
import gc
import inspect
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# transformers first: it decides its own kernel paths at import time, from the install
# as a user has it (our loader may later register a bare ``mamba_ssm`` package).
import transformers  # isort: skip
from transformers import NemotronHConfig, NemotronHForCausalLM  # isort: skip
from transformers.models.nemotron_h import modeling_nemotron_h as hf_modeling  # isort: skip

from torchtitan_nemotron3.hf.config import hf_config_from_args
from torchtitan_nemotron3.kernels import loader
from torchtitan_nemotron3.kernels.ops import auto_plan
from torchtitan_nemotron3.model import build_model_config, flavor_args
from torchtitan_nemotron3.model.flavors import NANO_30B
from torchtitan_nemotron3.model.flops import nparams_and_flops
from torchtitan_nemotron3.model.pattern import ATTENTION, MAMBA, MLP, MOE

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
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HF_EXPERTS: set[str] = set()  # transformers' resolved experts implementation(s)
GiB = 2**30


# ----------------------------------------------------------------------------- setup


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


def hf_paths() -> str:
    """Which implementation transformers resolved for each kernel hook."""
    out = []
    for name in (
        "mamba2_split_conv1d_scan_combined",
        "mamba2_chunk_scan",
        "causal_conv1d_fn",
    ):
        fn = getattr(hf_modeling, name, None)
        nonlocals = inspect.getclosurevars(fn).nonlocals if fn else {}
        if "is_new_implementation" in nonlocals:
            side = (
                nonlocals.get("package")
                if nonlocals["is_new_implementation"]
                else "torch"
            )
            out.append(f"{name}={side}")
    return ", ".join(out) or "unknown"


def bench_args(base, **changes):
    """Our args, with transformers' dt clamp (time_step_min, inf) so both compute the same."""
    changes.setdefault("time_step_limit", (base.time_step_min, math.inf))
    return base.replace(num_hidden_layers=None, **changes)


def configs(args) -> dict:
    out = {}
    if "debug" in args.configs:
        out["debug"] = bench_args(flavor_args("debugmodel"))
    if "nano" in args.configs:
        out["nano-proxy"] = bench_args(
            NANO_30B,
            hybrid_override_pattern="MEM*EM",
            n_routed_experts=args.experts,
            vocab_size=args.vocab,
        )
    return out


# ----------------------------------------------------------------------------- models


def build_ours(margs, dtype, device, kernel_backend, compile_blocks):
    cfg = build_model_config(margs, kernel_backend=kernel_backend)
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_states()
        for name, p in model.named_parameters():  # D and dt_bias away from their init
            if name.endswith((".D", ".dt_bias")):
                p.add_(0.3 * torch.randn_like(p))
    model = model.to(dtype)
    if compile_blocks:
        for block in model.layers.values():
            block.compile(fullgraph=True)
    return model, cfg


def hf_to_ours(name: str) -> str:
    """transformers' in-memory parameter name → ours."""
    name = name.removeprefix("model.")
    for old, new in (
        ("embeddings.weight", "tok_embeddings.weight"),
        ("norm_f.weight", "norm.weight"),
        ("mixer.gate.e_score_correction_bias", "mixer.expert_bias_E"),
        ("mixer.gate.weight", "mixer.router.gate.weight"),
        ("mixer.experts.up_proj", "mixer.routed_experts.inner_experts.w1_EFD"),
        ("mixer.experts.down_proj", "mixer.routed_experts.inner_experts.w2_EDF"),
    ):
        name = name.replace(old, new)
    return name


def build_hf(margs, ours: nn.Module, dtype, device, compile_blocks):
    fields = hf_config_from_args(margs)
    fields["time_step_limit"] = tuple(
        margs.time_step_limit
    )  # JSON encodes inf; not here
    cfg = NemotronHConfig(**fields)
    cfg.use_cache = False
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = NemotronHForCausalLM(cfg)
    hf.to_empty(device=device)
    ours_sd = ours.state_dict()
    hf_sd = hf.state_dict()
    assert sorted(map(hf_to_ours, hf_sd)) == sorted(ours_sd), "parameter sets differ"
    assert {n for n, _ in hf.named_buffers()} <= set(hf_sd), "non-persistent buffers"
    with torch.no_grad():
        for name, t in hf_sd.items():
            t.copy_(ours_sd[hf_to_ours(name)])
    hf = hf.to(dtype).train()
    HF_EXPERTS.add(str(hf.config._experts_implementation))
    if compile_blocks:
        for block in hf.model.layers:
            block.compile()
    return hf


def build_mamba_ssm_mixer(ours_mixer, margs, dtype, device):
    """mamba-ssm's ``Mamba2`` with our mixer's shapes and weights (norm after gate, in
    groups). Its d_inner is expand·d_model, so it is built at d_model = d_inner/2 and
    its in/out projections are then swapped for ``hidden_size``-wide ones."""
    module, _ = loader.import_bypassing_init(loader.MAMBA_SSM, "modules.mamba2")
    conv_ok = loader.conv_kernels()[0] is not None
    d_inner = margs.mamba_num_heads * margs.mamba_head_dim
    m = module.Mamba2(
        d_model=d_inner // 2,
        expand=2,
        d_state=margs.ssm_state_size,
        d_conv=margs.conv_kernel,
        headdim=margs.mamba_head_dim,
        ngroups=margs.n_groups,
        chunk_size=margs.chunk_size,
        rmsnorm=True,
        norm_before_gate=False,
        dt_limit=tuple(margs.time_step_limit),
        use_mem_eff_path=conv_ok,
        device=device,
        dtype=torch.float32,
    )
    m.in_proj = nn.Linear(
        margs.hidden_size, m.in_proj.out_features, bias=False, device=device
    )
    m.out_proj = nn.Linear(d_inner, margs.hidden_size, bias=False, device=device)
    theirs = m.state_dict()
    with torch.no_grad():
        for name, t in ours_mixer.state_dict().items():
            theirs[name].copy_(t)
    label = "mamba-ssm Mamba2 " + (
        "(fused conv+scan)" if conv_ok else "(torch conv, Triton SSD)"
    )
    return m.to(dtype).train(), label


# ----------------------------------------------------------------------------- timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_rise(step) -> float | None:
    """Rise of the peak RSS over the resident size before ``step`` (needs /proc)."""

    def status_kib():
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith("Vm"))
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        rss_before, _ = status_kib()
        step()
        return (status_kib()[1] - rss_before) * 1024
    except (OSError, KeyError, ValueError):
        return None


def step_memory(
    step, device, params, use_tracker=True
) -> tuple[float | None, float | None]:
    """(peak, after forward) memory of one step, above what was allocated before it.

    ``step(after_forward)`` calls ``after_forward()`` between its forward and backward;
    the memory then is what the forward saved for backward (plus its output). CUDA:
    the caching allocator's counters. CPU: torch's MemTracker (a dispatch mode that
    counts the bytes of every tensor the step creates, so malloc's reuse of freed
    memory hides nothing); compiled code refuses to run under a dispatch mode, so with
    ``use_tracker=False`` the peak-RSS rise instead (no after-forward number)."""
    held = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step(lambda: held.append(torch.cuda.memory_allocated(device) - before))
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before, held[0]
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        MemTracker = None
    if MemTracker is None or not use_tracker:
        rise = rss_rise(lambda: step(lambda: None))
        return (None if rise is None else RSS(rise)), None
    tracker = MemTracker()
    # Known beforehand, so views of them (saved for backward) are not counted as new.
    tracker.track_external(*params)
    resident = sum(p.untyped_storage().nbytes() for p in params)

    def total(kind):
        return tracker.get_tracker_snapshot(kind)[device]["Total"] - resident

    with tracker:
        step(lambda: held.append(total("current")))
        peak = total("peak")
    return peak, held[0]


class RSS(float):
    """A peak-RSS rise: a lower bound (malloc reuses freed memory without a new peak)."""


@dataclass
class Timing:
    times: list[float] = field(default_factory=list)
    peak_bytes: float | None = None  # step peak above the memory allocated before it
    act_bytes: float | None = None  # held between forward and backward

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """Half the interquartile range of the timed steps, relative to the median
        (quartiles, not extremes: a stray slow step from other load should not count)."""
        if len(self.times) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.times, n=4, method="inclusive")
        return (q3 - q1) / 2 / self.seconds


def time_interleaved(
    steps: dict, device, reps: int, warmup: int, min_seconds: float, compiled: bool
) -> dict:
    """Time each implementation's step, alternating between them rep by rep, so load
    from anything else on the machine hits all of them alike; ratios are taken per
    rep. At least ``reps`` reps, more (up to 50) until ``min_seconds`` of timing.

    Memory: on eager CPU, the first warm-up step runs under the tensor tracker (its
    overhead is not timed); on CUDA, or compiled, a separate step after timing (the
    first steps include compilation and Triton autotuning)."""
    in_warmup = device.type == "cpu" and not compiled
    results = {label: Timing() for label in steps}

    def run(label, after_forward=None):
        step, params = steps[label]
        for p in params:
            p.grad = None
        step(after_forward)

    def measure(label):
        gc.collect()
        results[label].peak_bytes, results[label].act_bytes = step_memory(
            lambda after_forward: run(label, after_forward),
            device,
            steps[label][1],
            use_tracker=not compiled,
        )

    for label in list(steps):
        try:
            for i in range(max(warmup, 1)):
                if i == 0 and in_warmup:
                    measure(label)
                else:
                    run(label)
        except Exception as e:  # noqa: BLE001 - an implementation that fails is a result
            print(f"  {label}: failed: {type(e).__name__}: {e}")
            del steps[label], results[label]
    if not steps:
        return results
    sync(device)
    start = time.perf_counter()
    while True:
        for label in steps:
            t0 = time.perf_counter()
            run(label)
            sync(device)
            results[label].times.append(time.perf_counter() - t0)
        n = len(results[next(iter(steps))].times)
        if n >= 50 or (n >= reps and time.perf_counter() - start >= min_seconds):
            break
    if not in_warmup:
        for label in steps:
            measure(label)
    return results


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    config: str
    name: str
    tokens: int
    flops_per_token: float
    impls: dict = field(default_factory=dict)  # label -> (step fn, params, output fn)


def layer_flops_per_token(layer_cfg, seq_len: int) -> int:
    """Training FLOPs per token of one block, by ``model/flops.py``'s rules."""
    no_head = type("Head", (), {"in_features": 0, "out_features": 0, "bias": False})
    shim = type("Cfg", (), {"lm_head": no_head, "layers": [layer_cfg]})
    return nparams_and_flops(shim, nn.Module(), seq_len)[1]


def block_case(cname, margs, symbol, a, device) -> Case:
    largs = bench_args(margs, hybrid_override_pattern=symbol, vocab_size=256)
    ours_model, cfg = build_ours(largs, a.dtype, device, a.kernel_backend, a.compile)
    hf_model = build_hf(largs, ours_model, a.dtype, device, a.compile_hf)
    ours, hf = ours_model.layers["0"], hf_model.model.layers[0]
    g = torch.Generator(device=device).manual_seed(1)
    shape = (a.batch, a.seq_len, margs.hidden_size)
    h = torch.randn(shape, generator=g, device=device, dtype=a.dtype)
    grad = torch.randn(shape, generator=g, device=device, dtype=a.dtype)

    def impl(fn, module):
        def run(after_forward=None):
            out = fn(h.detach().requires_grad_())
            if after_forward:
                after_forward()
            out.backward(grad)

        return run, [p for p in module.parameters()], lambda: fn(h)

    case = Case(
        cname,
        f"block {symbol}",
        a.batch * a.seq_len,
        layer_flops_per_token(cfg.layers[0], a.seq_len),
    )
    case.impls["ours"] = impl(lambda x: ours(x, None), ours)
    case.impls["transformers"] = impl(lambda x: hf(x), hf)
    if symbol == MAMBA and "mixer" in a.only:
        if device.type != "cuda":
            print("  [mixer] mamba-ssm Mamba2 skipped: needs CUDA")
        else:
            try:
                ref, label = build_mamba_ssm_mixer(ours.mixer, largs, a.dtype, device)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"  [mixer] mamba-ssm Mamba2 skipped: {e}")
            else:
                mixer = Case(cname, "mixer M", case.tokens, case.flops_per_token)
                mixer.impls["ours"] = impl(lambda x: ours.mixer(x, None), ours.mixer)
                mixer.impls[label] = impl(lambda x: ref(x), ref)
                return [case, mixer]
    return [case]


def model_case(cname, margs, a, device) -> Case:
    ours, cfg = build_ours(margs, a.dtype, device, a.kernel_backend, a.compile)
    hf = build_hf(margs, ours, a.dtype, device, a.compile_hf)
    g = torch.Generator(device=device).manual_seed(2)
    tokens = torch.randint(
        0, margs.vocab_size, (a.batch, a.seq_len), generator=g, device=device
    )
    labels = torch.randint(
        0, margs.vocab_size, tokens.shape, generator=g, device=device
    )

    def impl(fn, module):
        def run(after_forward=None):
            logits = fn()
            if after_forward:
                after_forward()
            F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).backward()

        return run, [p for p in module.parameters()], fn

    case = Case(
        cname,
        f"model {margs.hybrid_override_pattern}",
        a.batch * a.seq_len,
        nparams_and_flops(cfg, ours, a.seq_len)[1],
    )
    case.impls["ours"] = impl(lambda: ours(tokens), ours)
    case.impls["transformers"] = impl(
        lambda: hf(input_ids=tokens, use_cache=False).logits, hf
    )
    return case


def head_case(cname, margs, a, device) -> Case:
    """Ours only: final norm + lm_head + cross-entropy, the part of a step outside the
    blocks (for the full-model estimate)."""
    cfg = build_model_config(margs)
    with torch.device(device):
        norm, lm_head = cfg.norm.build(), cfg.lm_head.build()
    with torch.no_grad():
        norm.weight.fill_(1.0)
        lm_head.weight.normal_(0.0, margs.initializer_range)
    norm, lm_head = norm.to(a.dtype), lm_head.to(a.dtype)
    g = torch.Generator(device=device).manual_seed(3)
    shape = (a.batch, a.seq_len, margs.hidden_size)
    h = torch.randn(shape, generator=g, device=device, dtype=a.dtype)
    labels = torch.randint(0, margs.vocab_size, shape[:2], generator=g, device=device)

    def fwd(x):
        return lm_head(norm(x))

    def run(after_forward=None):
        logits = fwd(h.detach().requires_grad_())
        if after_forward:
            after_forward()
        F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).backward()

    case = Case(
        cname, "head", a.batch * a.seq_len, 6 * margs.hidden_size * margs.vocab_size
    )
    case.impls["ours"] = (
        run,
        [*norm.parameters(), *lm_head.parameters()],
        lambda: fwd(h),
    )
    return case


def check_outputs(case: Case, dtype) -> str:
    """Outputs finite, and close to ours (norm-relative); returns a note for the table."""
    with torch.no_grad():
        outs = {label: out_fn() for label, (_, _, out_fn) in case.impls.items()}
    notes = []
    ref = outs["ours"]
    for label, out in outs.items():
        if not torch.isfinite(out).all():
            notes.append(f"{label}: NOT FINITE")
        elif label != "ours":
            err = rel_err(out, ref)
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            notes.append(f"rel diff {err:.1e}" + ("" if err <= tol else " MISMATCH"))
    return "; ".join(notes)


def run_case(case: Case, a, device, peak, rows):
    note = check_outputs(case, a.dtype)
    steps = {label: (step, params) for label, (step, params, _) in case.impls.items()}
    compiled = a.compile or a.compile_hf
    timings = time_interleaved(steps, device, a.reps, a.warmup, a.min_seconds, compiled)
    base = timings.get("ours")
    for label, t in timings.items():
        tok_s = case.tokens / t.seconds
        tflops = tok_s * case.flops_per_token / 1e12
        # ratio: median over reps of (their time / our time in the same rep)
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
    if timings:
        print_row_block(rows[-len(timings) :])


# ----------------------------------------------------------------------------- output


HEADER = (
    "| config | case | impl | ms/step | tokens/s | TFLOP/s | MFU | step mem | after fwd | "
    "ours speed-up | check |"
)


def fmt_mem(b):
    if b is None:
        return "n/a"
    return (
        f">= {max(b, 0) / GiB:.2f} GiB (RSS)"
        if isinstance(b, RSS)
        else f"{b / GiB:.2f} GiB"
    )


def print_row_block(rows):
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
    peak = peak_tflops(a, device)
    cases = configs(a)
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
        f"transformers {transformers.__version__}: {hf_paths()}; MoE experts "
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
    rows = []
    for cname, margs in cases.items():
        for symbol in (MAMBA, ATTENTION, MLP, MOE):
            if symbol in a.only:
                for case in block_case(cname, margs, symbol, a, device):
                    run_case(case, a, device, peak, rows)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if "model" in a.only and cname == "nano-proxy":
            run_case(head_case(cname, margs, a, device), a, device, peak, rows)
        if "model" in a.only:
            run_case(model_case(cname, margs, a, device), a, device, peak, rows)
            gc.collect()
    print(
        f"\ntransformers MoE experts implementation: {', '.join(sorted(HF_EXPERTS)) or 'n/a'}"
    )
    nano_estimate(rows, a, device)


if __name__ == "__main__":
    sys.exit(main())
