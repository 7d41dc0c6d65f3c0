"""Faults injected into real 2-rank gloo runs of the debug model through
``run_train.sh`` (``tests/faults/inject.py``; TorchTitan is not patched): a rank
SIGKILLed at each phase of a step and of a save, a rewind killed inside the
re-save of a step of the abandoned timeline, repeated kills, hung and frozen
ranks (in training and at init), a crash loop (its root cause reported once),
a relaunch of a finished run, and every process group's timeout.

Each faulted job must end like the uninterrupted reference (one run shared by the
module): its final checkpoint (12 steps, interval 4, full state at the end)
equal entry by entry (model, optimizer, scheduler, train state, data-loader
state, per-rank RNG state: every rank also scales its gradients by a random
draw, so an RNG state that does not survive shows), each rank's batch of each
step of the final lineage the same as the reference's, at most ``interval``
steps redone, and no process of the job alive 10 s after it.

CI runs one kill phase per rank and the sleeping-rank hang; ``pytest --matrix``
runs the rest.
"""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest

from tests.faults._run import (
    INTERVAL,
    STEPS,
    differences,
    final_state,
    launch,
    lineage,
    steps_by_attempt,
    steps_lost,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    job = launch(tmp, "reference")
    assert job.rc == 0, job.log[-4000:]
    assert not job.leftovers
    return {
        "job": job,
        "state": final_state(job.checkpoint / f"step-{STEPS}"),
        "lineage": lineage(job.dump),
    }


def assert_like_reference(job, reference, max_lost=INTERVAL, first_step=1):
    assert job.rc == 0, job.log[-6000:]
    assert not job.leftovers, f"processes alive 10 s after the job: {job.leftovers}"
    state = final_state(job.checkpoint / f"step-{STEPS}")
    bad = differences(state, reference["state"])
    assert not bad, f"{len(bad)} entries differ from the reference, e.g. {bad[:5]}"
    got = lineage(job.dump)
    want = {k: v for k, v in reference["lineage"].items() if k[1] >= first_step}
    assert got == want, "final lineage's batches differ"
    assert len(set(got.values())) == len(got), "a batch was trained twice"
    lost = steps_lost(job.dump)
    assert lost <= max_lost, (lost, steps_by_attempt(job.dump))
    return lost


def _kill(tmp_path, reference, rank, step, phase, *args, max_lost=INTERVAL):
    job = launch(
        tmp_path, f"kill-{rank}-{phase}", *args,
        fault=f"{rank}:{step}:{phase}", env={"MAX_RESTARTS": "1"},
    )  # fmt: skip
    assert f"[inject] rank {rank} attempt 0 step" in job.log, "the fault never fired"
    assert len(steps_by_attempt(job.dump)) == 2, steps_by_attempt(job.dump)
    # the launcher's end-of-job report names the killed rank, not its survivor
    report = job.log[job.log.index("[launch] finished after 1 restart(s); root cause"):]
    assert f"[launch]   rank {rank} (attempt 0): killed by SIGKILL" in report, report
    lost = assert_like_reference(job, reference, max_lost)
    print(f"kill rank {rank} at {phase} of step {step}: rc 0, equal, {lost} steps "
          f"redone, {job.seconds:.0f} s")  # fmt: skip
    return job


# The save of step 8 is killed on the coordinator (rank 0, after every rank's data,
# before .metadata) and on rank 1 inside its data write.
DEFAULT_KILLS = [(0, 8, "before_commit"), (1, 8, "write")]
MATRIX_KILLS = [
    (0, 6, "mid_step"), (1, 6, "mid_step"),
    (0, 8, "write"),
    (1, 8, "before_commit"),
    (0, 8, "after_commit"), (1, 8, "after_commit"),
]  # fmt: skip


@pytest.mark.parametrize("rank,step,phase", DEFAULT_KILLS)
def test_kill_restarts_and_ends_like_uninterrupted(tmp_path, reference, rank, step, phase):
    job = _kill(tmp_path, reference, rank, step, phase)
    # A killed save never becomes a step: the restart resumed from step 4.
    assert steps_by_attempt(job.dump)[1][0] == 5


@pytest.mark.matrix
@pytest.mark.parametrize("rank,step,phase", MATRIX_KILLS)
def test_kill_matrix(tmp_path, reference, rank, step, phase):
    job = _kill(tmp_path, reference, rank, step, phase)
    resumed = steps_by_attempt(job.dump)[1][0]
    assert resumed == (9 if phase == "after_commit" else 5)


@pytest.mark.matrix
def test_kill_inside_purge(tmp_path, reference):
    """Interval 2, keep_latest_k 2: the save of step 8 purges step 4; rank 0 dies
    in the purge thread after deleting part of it. No half-deleted step is ever
    a step: the restart resumes from a whole one and ends like the reference."""
    job = _kill(tmp_path, reference, 0, 4, "purge",
                "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "2")  # fmt: skip
    names = sorted(p.name for p in job.checkpoint.iterdir())
    assert not [n for n in names if n.startswith((".trash", ".tmp"))], names
    assert "step-4" not in names


@pytest.mark.matrix
@pytest.mark.parametrize("rank,phase", [(0, "before_commit"), (1, "write"), (0, "after_commit")])
def test_kill_async_save(tmp_path, reference, rank, phase):
    job = _kill(tmp_path, reference, rank, 8, phase, "--checkpoint.async_mode", "async",
                max_lost=2 * INTERVAL)  # fmt: skip
    # the async-checkpoint group has a timeout (the init one) in every attempt
    assert_group_timeouts(job.dump, 300, 100, gloo_groups=2)


@pytest.mark.matrix
def test_rewind_killed_inside_resave_never_mixes_timelines(tmp_path, reference):
    """A finished run rewound to step 4; rank 1 dies inside the re-save of step 8.
    The old timeline's 8 and 12 are moved aside (not loaded, not overwritten),
    the restart resumes the new timeline (4, not the old 8), and the run ends like
    the reference (training from 4 is deterministic)."""
    ref_ckpt = reference["job"].checkpoint
    dump = tmp_path / "out"
    shutil.copytree(ref_ckpt, dump / "checkpoint")
    job = launch(
        tmp_path, "rewind", "--checkpoint.load_step", "4",
        fault="1:8:write", env={"MAX_RESTARTS": "1"}, dump=dump,
    )  # fmt: skip
    assert "[inject] rank 1 attempt 0 step" in job.log
    attempts = steps_by_attempt(dump)
    assert attempts[0][0] == 5 and attempts[1][0] == 5, attempts
    assert "this rewind was applied" in job.log
    aside = [p for p in (dump / "checkpoint").iterdir() if p.name.startswith("rewound-to-4")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == [
        "step-12", "step-8"]  # fmt: skip
    history = json.loads((dump / "checkpoint" / "timeline.json").read_text())
    assert [h["load_step"] for h in history] == [4]
    assert_like_reference(job, reference, first_step=5)


@pytest.mark.matrix
def test_ten_kill_and_restart_cycles(tmp_path, reference):
    """Rank 1 SIGKILLed mid-step in each of ten attempts (interval 1): the
    eleventh attempt finishes and the job ends like the reference, the data
    loader's row counter included."""
    job = launch(
        tmp_path, "cycles", "--checkpoint.interval", "1",
        fault="1:0:mid_step", env={"MAX_RESTARTS": "10", "FAULT_CYCLES": "10"},
        timeout=1500,
    )  # fmt: skip
    assert len(steps_by_attempt(job.dump)) == 11, steps_by_attempt(job.dump)
    lost = assert_like_reference(job, reference, max_lost=10)
    print(f"ten kill-and-restart cycles: rc 0, equal, {lost} steps redone, "
          f"{job.seconds:.0f} s")  # fmt: skip


def test_finished_run_relaunched_exits_at_once(tmp_path, reference):
    dump = tmp_path / "out"
    shutil.copytree(reference["job"].checkpoint, dump / "checkpoint")
    job = launch(tmp_path, "again", dump=dump, env={"MAX_RESTARTS": "1"})
    assert job.rc == 0, job.log[-3000:]
    assert "Run already complete" in job.log
    assert not steps_by_attempt(dump), "trained again"
    assert not job.leftovers


# -------------------------------------------------------------- preemption


@pytest.mark.matrix
def test_sigterm_to_launcher_saves_one_step_and_resumes_losing_none(tmp_path, reference):
    """SIGTERM to run_train.sh while rank 0 trains step 6: every rank stops after
    the same step, saves it, and the launcher exits 0 within 30 s; launched
    again, the job resumes at the next step and ends like the reference."""
    job = launch(tmp_path, "term", term_at_step=6, env={"MAX_RESTARTS": "1"})
    assert job.rc == 0, job.log[-4000:]
    took = job.ended - job.signalled
    assert took <= 30, f"{took:.1f} s from SIGTERM to exit"
    saved = int(re.search(r"every rank saved step (\d+)", job.log).group(1))
    assert saved >= 6 and (job.checkpoint / f"step-{saved}" / ".metadata").exists()
    trained = steps_by_attempt(job.dump)[0]
    assert max(trained) == saved, (trained, saved)
    assert not job.leftovers
    again = launch(tmp_path, "resume", dump=job.dump)
    trained_again = steps_by_attempt(job.dump)[0][len(trained):]
    assert trained_again[0] == saved + 1, "steps lost or redone"
    assert_like_reference(again, reference)
    print(f"SIGTERM: exit 0 {took:.1f} s after the signal, saved step {saved}, 0 lost")


# ------------------------------------------------------------------- hangs


def _stall_to_exit(job) -> float:
    times = (job.dump / "batches" / "fault-times.txt").read_text().split()
    return job.ended - float(times[-1])


def test_sleeping_rank_ends_the_job(tmp_path):
    """Rank 1 sleeps inside step 3 (before the step's all-reduce): with a 10 s
    train timeout the job exits non-zero within 25 s naming the collective."""
    job = launch(tmp_path, "sleep", "--comm.train_timeout_seconds", "10",
                 fault="1:3:sleep", timeout=300)  # fmt: skip
    assert job.rc != 0
    waited = _stall_to_exit(job)
    assert waited <= 25, f"{waited:.1f} s from the stall to the job's exit"
    assert re.search(r"timed out.*(all_reduce|allreduce)", job.log, re.I | re.S), job.log[-3000:]
    # The launcher's report: the waiting rank's timeout is the root cause (the
    # sleeper, stopped by torchrun's SIGTERM, is not), with the collective named.
    report = job.log[job.log.index("[launch] FAILED after 1 attempt(s)"):]
    assert "[launch]   rank 0 (attempt 0): RuntimeError:" in report, report
    assert "[launch]     rank 0: collective timed out: gloo:all_reduce" in report, report
    assert not job.leftovers
    print(f"sleeping rank: exit {job.rc} {waited:.1f} s after the stall")


@pytest.mark.matrix
def test_frozen_rank_ends_the_job(tmp_path):
    job = launch(tmp_path, "stop", "--comm.train_timeout_seconds", "10",
                 fault="1:3:stop", timeout=300)  # fmt: skip
    assert job.rc != 0
    waited = _stall_to_exit(job)
    assert waited <= 55, f"{waited:.1f} s from the stall to the job's exit"
    assert not job.leftovers
    print(f"frozen rank: exit {job.rc} {waited:.1f} s after the stall")


@pytest.mark.matrix
def test_hang_in_first_attempt_restarts_and_ends_like_uninterrupted(tmp_path, reference):
    job = launch(tmp_path, "sleep-restart", "--comm.train_timeout_seconds", "10",
                 fault="1:6:sleep", env={"MAX_RESTARTS": "1"})  # fmt: skip
    assert_like_reference(job, reference)


@pytest.mark.matrix
@pytest.mark.parametrize("phase", ["init_sleep", "setup_sleep"])
def test_rank_hung_at_init_ends_the_job(tmp_path, phase):
    """Rank 1 hangs before the process group exists (the others wait in its
    rendezvous) or right after (the others wait in their first collective): with
    a 10 s init timeout the job exits non-zero within 10 + 30 s, the launcher's
    root cause naming what timed out."""
    job = launch(tmp_path, phase, "--comm.init_timeout_seconds", "10",
                 fault=f"1:0:{phase}", timeout=300)  # fmt: skip
    assert job.rc != 0
    waited = _stall_to_exit(job)
    assert waited <= 10 + 30, f"{waited:.1f} s from the stall to the job's exit"
    report = job.log[job.log.index("[launch] FAILED after 1 attempt(s); root cause:"):]
    if phase == "init_sleep":
        assert ("[launch]   rank 0 (attempt 0): DistStoreError: Timed out after"
                in report and "1/2 clients joined" in report), report  # fmt: skip
        assert ("process-group init (init_process_group) timed out "
                "(comm.init_timeout_seconds = 10)") in report, report  # fmt: skip
    else:  # the first collective, still under the init timeout
        assert "[launch]     rank 0: collective timed out: gloo:all_reduce" in report, report
        assert "timeout 10000 ms" in report, report
    assert not job.leftovers
    print(f"{phase}: exit {job.rc} {waited:.1f} s after the stall")


def _groups(dump) -> dict[tuple[int, str], list[tuple[int, int, str, float | None]]]:
    """``{(attempt, "setup" | "trained"): [(rank, size, backend, timeout s)]}``."""
    out: dict = {}
    for rank in (0, 1):
        for line in (dump / "batches" / f"groups-rank{rank}.txt").read_text().splitlines():
            attempt, at, _, size, kind, seconds = line.split()
            out.setdefault((int(attempt), at), []).append(
                (rank, int(size), kind, None if seconds == "None" else float(seconds)))
    return out


def assert_group_timeouts(dump, init: float, train: float, gloo_groups: int) -> None:
    """Every process group that carries collectives (gloo) has a timeout, in every
    attempt: the init timeout after the setup, then TorchTitan's train timeout on
    the default group and the init timeout on the async-checkpoint one; the rest
    are the fake backend of absent mesh axes (no collective)."""
    listed = _groups(dump)
    assert {at for _, at in listed} == {"setup", "trained"}, sorted(listed)
    for (attempt, at), groups in listed.items():
        real = [g for g in groups if g[2] == "ProcessGroupGloo"]
        assert len(real) == 2 * gloo_groups, (attempt, at, groups)
        assert all(g[2] == "FakeProcessGroup" for g in groups if g not in real), groups
        want = [init] * gloo_groups if at == "setup" else [train] + [init] * (gloo_groups - 1)
        for rank in (0, 1):
            assert [g[3] for g in real if g[0] == rank] == want, (attempt, at, rank, groups)


def test_every_process_group_has_a_timeout(reference):
    """The reference run (sync saves, TorchTitan's defaults: init 300 s, train
    100 s): the default group is the only real one on 2 ranks."""
    assert_group_timeouts(reference["job"].dump, 300, 100, gloo_groups=1)


@pytest.mark.integration
@pytest.mark.matrix
@pytest.mark.parametrize("bound", [True, False])
def test_mesh_group_creation_with_a_hung_rank_ends(tmp_path, bound):
    """4 gloo ranks, 5 s init timeout, rank 3 hung: the 2 × 2 mesh's groups are
    created after the default one. With ``bound_new_group_timeouts`` the others
    fail within seconds; with torch's default (30 min for gloo) they still wait
    after 60 s (measured 2026-12-07: > 85 s)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    worker = Path(__file__).with_name("group_timeout_worker.py")
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(worker), str(r), str(tmp_path / "init"),
                          "1" if bound else "0"], env=env, stdout=subprocess.PIPE, text=True)
        for r in range(4)
    ]  # fmt: skip
    try:
        outs = [procs[r].communicate(timeout=120 if bound else 60)[0] for r in range(3)]
        finished = True
    except subprocess.TimeoutExpired:
        finished = False
    finally:
        for p in procs:
            p.kill()
            p.wait()
    if not bound:
        assert not finished, "the mesh's groups did not wait for the hung rank"
        return
    assert finished
    for r, out in enumerate(outs):
        rank, what, seconds = out.split()
        assert int(rank) == r and what != "built" and float(seconds) <= 20, out


@pytest.mark.matrix
def test_crash_loop_stops_after_max_restarts(tmp_path):
    job = launch(tmp_path, "crash", fault="1:3:crash",
                 env={"MAX_RESTARTS": "2", "FAULT_ATTEMPT": "-1"})  # fmt: skip
    assert job.rc != 0
    assert sorted(steps_by_attempt(job.dump)) == [0, 1, 2]
    assert not job.leftovers
    # The root cause once, at the end (not once per attempt and rank): the
    # exception line, where it was raised and its traceback, naming the rank;
    # each attempt is one line, and no rank prints a traceback.
    assert job.log.count("injected deterministic crash at step 3") == 1, job.log[-3000:]
    assert job.log.count("Traceback") == 1, job.log[-3000:]
    lines = job.log.rstrip().splitlines()
    at = lines.index("[launch] FAILED after 3 attempt(s); root cause:")
    end = lines[at:]
    assert end[1] == ("[launch]   rank 1 (attempts 0, 1, 2): RuntimeError: injected "
                      "deterministic crash at step 3"), end  # fmt: skip
    assert re.fullmatch(r"\[launch\]     at tests/faults/inject\.py:\d+ in fire", end[2]), end
    assert re.fullmatch(r"\[launch\]     traceback \(\S+/attempt_2/1/error\.json\):", end[3]), end
    assert end[4] == "[launch]       Traceback (most recent call last):", end
    assert re.search(r'inject\.py", line \d+, in fire', "\n".join(end[5:])), end
    for attempt in range(3):
        assert re.search(rf"^\[launch\] attempt {attempt} failed: rank 0 \w+ \(exit -?\d+\), "
                         rf"rank 1 RuntimeError \(exit 1\)", job.log, re.M), attempt  # fmt: skip
