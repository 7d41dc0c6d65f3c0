"""End-to-end training harness: run ``run_train.sh`` and read the per-step losses.

Used by the end-to-end tests (qwen3 infrastructure check, NemotronH runs). It goes
through the real launcher (torchrun, TOML loader, CPU shims) rather than building
a Trainer in-process, so that what is tested is what users run.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_TRAIN = REPO_ROOT / "run_train.sh"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# TorchTitan's MetricsProcessor line: "step:  3  loss:  6.20311  grad_norm: ..."
_STEP_LOSS = re.compile(r"step:\s*(\d+)\s+loss:\s*([-+0-9.eE]+|nan|inf)")


def parse_step_losses(log: str) -> dict[int, float]:
    """``{step: loss}`` from a training log (rank 0's lines; colors stripped).

    With several ranks shown, ranks log the same global loss; the first one seen
    per step is kept.
    """
    losses: dict[int, float] = {}
    for line in _ANSI.sub("", log).splitlines():
        m = _STEP_LOSS.search(line)
        if m:
            losses.setdefault(int(m.group(1)), float(m.group(2)))
    return losses


def run_training(
    config_file: str | os.PathLike,
    ngpu: int,
    overrides: list[str],
    tmp_path: str | os.PathLike,
    *,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    require_steps: bool = True,
) -> list[float]:
    """Train with ``NGPU=ngpu CONFIG_FILE=config_file ./run_train.sh overrides``.

    Outputs go to ``<tmp_path>/outputs`` (unless ``--dump_folder`` is among the
    overrides) and the full log to ``<tmp_path>/train.log``. Returns the losses of
    the steps this run trained, in step order; raises ``RuntimeError`` with the
    log's tail if training fails, logs a non-finite loss, or logs no step (unless
    ``require_steps`` is False: a run that trains none, e.g. a seed checkpoint).
    """
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    args = list(overrides)
    if not any(a == "--dump_folder" or a.startswith("--dump_folder=") for a in args):
        args += ["--dump_folder", str(tmp_path / "outputs")]
    run_env = {
        # One intra-op thread per rank (torchrun's own default for >1 rank): on a
        # shared 2-core CI box, OpenMP spin-waiting under contention made steps
        # ~10x slower with 2 threads than with 1.
        "OMP_NUM_THREADS": "1",
        # run_train.sh's one-process check before torchrun costs ~10 s of imports
        # per launch; the ranks run the same checks, and tests/train/
        # test_toml_config.py tests the check itself.
        "CHECK_JOB": "0",
        **os.environ,
        "NGPU": str(ngpu),
        "CONFIG_FILE": str(config_file),
        "LOG_RANK": "0",
        **(env or {}),
    }
    log_file = tmp_path / "train.log"
    proc = subprocess.run(  # noqa: PLW1510 (the return code is checked below)
        [str(RUN_TRAIN), *args],
        cwd=REPO_ROOT,
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    log_file.write_text(proc.stdout)
    tail = "\n".join(proc.stdout.splitlines()[-60:])
    if proc.returncode != 0:
        raise RuntimeError(
            f"run_train.sh exited with {proc.returncode} (log: {log_file}):\n{tail}"
        )
    step_losses = parse_step_losses(proc.stdout)
    if not require_steps:
        return [step_losses[s] for s in sorted(step_losses)]
    if not step_losses:
        raise RuntimeError(
            f"no 'step: N loss: X' lines in the log ({log_file}):\n{tail}"
        )
    steps = sorted(step_losses)
    if steps != list(range(steps[0], steps[-1] + 1)):
        raise RuntimeError(f"missing steps in the log: got {steps} ({log_file})")
    losses = [step_losses[s] for s in steps]
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite loss: {losses} ({log_file})")
    return losses


# ---- shared by the multi-layout tests (tests/parallel, tests/train)

FP32_DEBUG_TOML = """\
[job]
{job}

[training]
local_batch_size = 4
seq_len = 128
mixed_precision_param = "float32"

[metrics]
log_freq = 1

[debug]
seed = 0  # same initial weights in every run, so runs can be compared
"""


def write_fp32_debug_toml(
    path: str | os.PathLike,
    config: str = "nemotron3_debugmodel",
    module: str | None = None,
    lr: float | None = None,
) -> Path:
    """The debug run in fp32 parameters (so "the same training" is checkable at
    fp32 precision), from ``config`` in ``module`` (the package's registry when
    None). ``lr`` replaces the config's: AdamW makes rounding differences
    between layouts lr-sized steps where a gradient is near zero, so the
    comparisons at 1e-4 that sum in another order use a smaller one."""
    job = f'config = "{config}"'
    if module is not None:
        job = f'module = "{module}"\n{job}'
    text = FP32_DEBUG_TOML.format(job=job)
    if lr is not None:
        text += (
            "\n[[optimizer.param_groups]]\n"
            f"[optimizer.param_groups.optimizer_kwargs]\nlr = {lr}\n"
        )
    path = Path(path)
    path.write_text(text)
    return path


def create_seed_checkpoint(config_file: str | os.PathLike, dump: Path) -> Path:
    """One process's initial weights as TorchTitan's seed checkpoint (``step-0``):
    layouts that initialise their shards with other random draws (TP, PP) start
    from it."""
    run_training(
        config_file,
        1,
        ["--checkpoint.enable", "--checkpoint.create_seed_checkpoint",
         "--dump_folder", str(dump)],
        dump.parent / f"{dump.name}-log",
        require_steps=False,
    )  # fmt: skip
    return dump / "checkpoint" / "step-0"


def copy_checkpoint(src_dump: Path, step: int, dst_dump: Path) -> None:
    """Start ``dst_dump`` with ``src_dump``'s checkpoint of ``step`` only, so a
    run there resumes from it."""
    (dst_dump / "checkpoint").mkdir(parents=True, exist_ok=True)
    shutil.copytree(
        src_dump / "checkpoint" / f"step-{step}",
        dst_dump / "checkpoint" / f"step-{step}",
    )


def hf_weights(checkpoint: Path, args) -> dict:
    """A DCP checkpoint's weights (``<dump>/checkpoint/step-N``) in the hub's
    format, converted once into ``hf-<dump>-N`` beside the dump folder."""
    from safetensors.torch import load_file

    from torchtitan_nemotron3.hf.dcp_convert import dcp_to_hf

    dump = checkpoint.parent.parent
    out = dump.parent / f"hf-{dump.name}-{checkpoint.name.removeprefix('step-')}"
    if not out.exists():
        dcp_to_hf(checkpoint, out, args)
    return load_file(out / "model.safetensors")


def max_rel_diff(got: list[float], ref: list[float]) -> float:
    """Largest |a - b| / |b| over two equally long loss curves."""
    assert len(got) == len(ref), (got, ref)
    return max(abs(a - b) / abs(b) for a, b in zip(got, ref))


def worst_weight_diff(got: dict, ref: dict) -> tuple[float, str]:
    """Largest ‖Δ‖/‖W‖ over tensors of the same names, and its name."""
    assert got.keys() == ref.keys(), set(got) ^ set(ref)
    return max(
        (float((got[n] - w).norm() / w.norm().clamp_min(1e-12)), n)
        for n, w in ref.items()
    )


def tensorboard_scalars(dump_folder: str | os.PathLike, prefix: str = "") -> dict:
    """``{tag: {step: value}}`` of the scalars under ``prefix`` that TorchTitan's
    TensorBoard logger wrote under ``dump_folder`` (``--metrics.enable_tensorboard``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = {p.parent for p in Path(dump_folder, "tb").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {
        tag: {e.step: e.value for e in acc.Scalars(tag)}
        for tag in acc.Tags()["scalars"]
        if tag.startswith(prefix)
    }
