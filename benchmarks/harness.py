"""Time and measure forward+backward steps: several implementations of one case in
one process, on the same inputs, alternating step by step, after an output check."""

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cases import Case


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RSS(float):
    """A peak-RSS rise: a lower bound (malloc reuses freed memory without a new peak)."""


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


def check_outputs(case: "Case", dtype) -> str:
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


def run_case(case: "Case", a, device) -> tuple[str, dict[str, Timing]]:
    """Check the implementations' outputs against ours, then time them:
    (check note, timing per implementation that ran)."""
    note = check_outputs(case, a.dtype)
    steps = {label: (step, params) for label, (step, params, _) in case.impls.items()}
    compiled = a.compile or a.compile_hf
    timings = time_interleaved(steps, device, a.reps, a.warmup, a.min_seconds, compiled)
    return note, timings
