"""Launching the fault jobs through ``run_train.sh`` and reading what they leave.

A job is ``faults_config``'s debug run on 2 gloo ranks; ``FAULT`` picks what
``inject`` does. ``final_state`` loads a checkpoint folder whole (no process group)
so two runs' model, optimizer, scheduler, train, data-loader and RNG states can be
compared value by value; ``lineage`` reads the per-batch hashes the ranks logged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_TRAIN = REPO_ROOT / "run_train.sh"
JOB_TOML = '[job]\nmodule = "tests.faults.faults_config"\nconfig = "nemotron3_debug_faults"\n'
STEPS, INTERVAL = 12, 4


@dataclass
class Job:
    rc: int
    log: str
    seconds: float
    ended: float  # time.time() when the launcher exited
    dump: Path
    leftovers: list[int]  # processes of the job still alive 10 s after it ended
    signalled: float | None = None  # time.time() of the SIGTERM sent to the launcher

    @property
    def checkpoint(self) -> Path:
        return self.dump / "checkpoint"


def _job_pids(tag: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if f"FAULT_JOB={tag}".encode() in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def launch(
    tmp: Path,
    name: str,
    *args: str,
    fault: str = "",
    env: dict[str, str] | None = None,
    timeout: float = 480,
    dump: Path | None = None,
    term_at_step: int | None = None,
) -> Job:
    """Run the job once (``MAX_RESTARTS`` etc. through ``env``); never raises on
    a failed run: the caller checks ``rc``."""
    tmp.mkdir(parents=True, exist_ok=True)
    toml = tmp / "faults.toml"
    toml.write_text(JOB_TOML)
    dump = dump or tmp / "out"
    logdir = dump / "batches"
    logdir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex
    run_env = {
        "OMP_NUM_THREADS": "1",
        "CHECK_JOB": "0",
        **os.environ,
        "NGPU": "2",
        "CONFIG_FILE": str(toml),
        "LOG_RANK": "0,1",
        "FAULT": fault,
        "FAULT_LOG": str(logdir),
        "FAULT_JOB": tag,
        **(env or {}),
    }
    begin = time.monotonic()
    proc = subprocess.Popen(
        [str(RUN_TRAIN), "--dump_folder", str(dump), *args],
        cwd=REPO_ROOT, env=run_env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    signalled = None
    if term_at_step is not None:  # SIGTERM the launcher once rank 0 trains that step
        rank0 = logdir / "batches-rank0.txt"
        while proc.poll() is None and time.monotonic() - begin < timeout:
            steps = [int(x.split()[1]) for x in rank0.read_text().splitlines()] if rank0.exists() else []
            if steps and max(steps) >= term_at_step:
                proc.send_signal(signal.SIGTERM)
                signalled = time.time()
                break
            time.sleep(0.2)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in _job_pids(tag):
            os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += f"\n[test] killed after {timeout} s"
    seconds, ended = time.monotonic() - begin, time.time()
    deadline = time.monotonic() + 10
    while (left := _job_pids(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:  # do not leak them into the next test
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    (tmp / f"{name}.log").write_text(out)
    return Job(proc.returncode, out, seconds, ended, dump, left, signalled)


def final_state(step_dir: Path) -> dict:
    """Every entry of a DCP checkpoint, flattened to ``{dotted key: value}``."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    flat = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[prefix + k] = v

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        walk(_load_state_dict_from_keys(checkpoint_id=str(step_dir)))
    return flat


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (so NaN equals NaN and -0.0 differs from 0.0)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def differences(got: dict, ref: dict) -> list[str]:
    """Keys whose values are not bitwise equal (tensors) or equal (the rest)."""
    bad = sorted(set(got) ^ set(ref))
    for k in sorted(set(got) & set(ref)):
        a, b = got[k], ref[k]
        if isinstance(b, torch.Tensor):
            same = (
                isinstance(a, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(_bits(a), _bits(b))
            )  # fmt: skip
        else:
            same = a == b
        if not same:
            bad.append(k)
    return bad


def lineage(dump: Path) -> dict[tuple[int, int], str]:
    """``{(rank, step): batch hash}`` of the final lineage: for each step, the
    last attempt that trained it."""
    records: dict[tuple[int, int], tuple[int, str]] = {}
    for path in sorted((dump / "batches").glob("batches-rank*.txt")):
        for line in path.read_text().splitlines():
            attempt, step, rank, digest = line.split()
            key = (int(rank), int(step))
            if key not in records or int(attempt) >= records[key][0]:
                records[key] = (int(attempt), digest)
    return {k: v[1] for k, v in records.items()}


def steps_by_attempt(dump: Path) -> dict[int, list[int]]:
    """Rank 0's trained steps per torchrun attempt."""
    out: dict[int, list[int]] = {}
    path = dump / "batches" / "batches-rank0.txt"
    for line in path.read_text().splitlines() if path.exists() else []:
        attempt, step, _, _ = line.split()
        out.setdefault(int(attempt), []).append(int(step))
    return out


def steps_lost(dump: Path) -> int:
    """Steps trained by an attempt and trained again by the next one."""
    attempts = steps_by_attempt(dump)
    lost = 0
    for a in sorted(attempts)[:-1]:
        nxt = attempts.get(a + 1, [])
        if nxt:
            lost += max(attempts[a]) - (min(nxt) - 1)
    return lost
