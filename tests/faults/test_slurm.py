"""``scripts/slurm/train.sbatch`` on a real one-node Slurm cluster on localhost
(``slurm_cluster``; Debian's ``slurm-wlm`` and ``munge``): the faults jobs' debug
run (2 gloo ranks, 12 steps, interval 4, ``keep_latest_k`` 3, full final state)
submitted with ``sbatch`` and interrupted while rank 0 trains step 6, either

* preempted: ``scontrol requeue`` (what a preemption with ``PreemptMode=REQUEUE``
  does: SIGTERM to every process of the job, SIGKILL ``KillWait`` = 30 s later,
  the job queued again), or
* near its time limit: the signal the script's ``#SBATCH --signal`` asks for, sent
  now with ``scancel`` (``B:USR1@120``: SIGUSR1 to the batch script, which SIGTERMs
  the training step and requeues the job itself).

Either way the requeued job (``SLURM_RESTART_COUNT`` 1) must resume from the step
the preemption path saved, train each of the 12 steps exactly once in all, and
end with a final checkpoint equal, bitwise, to an uninterrupted ``run_train.sh``
run's, with no process of the job left 10 s after it (nor, between the two runs,
of the first). The sbatch script's GPU and CPU requests are overridden on the
command line (one node, no GPUs, this machine's cores).
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
import uuid

import pytest

from tests.faults._run import (
    JOB_TOML,
    REPO_ROOT,
    STEPS,
    _job_pids,
    differences,
    final_state,
    launch,
    lineage,
)
from tests.faults.slurm_cluster import Cluster, missing_binaries

_missing = missing_binaries()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.matrix,
    pytest.mark.skipif(
        bool(_missing),
        reason=f"Slurm not installed ({', '.join(_missing)} not found): "
        "apt-get install slurmctld slurmd munge",
    ),
]

SBATCH = REPO_ROOT / "scripts" / "slurm" / "train.sbatch"
INTERRUPT_AT = 6


def time_limit_signal() -> list[str]:
    """``scancel`` options sending what ``#SBATCH --signal=[B:]SIG@T`` makes Slurm
    send ``T`` seconds before the time limit (``B:``: to the batch script only)."""
    spec = re.search(r"^#SBATCH --signal=(B:)?(\w+)@\d+$", SBATCH.read_text(), re.MULTILINE)
    assert spec, "train.sbatch asks for no time-limit signal"
    return (["--batch"] if spec.group(1) else []) + [f"--signal={spec.group(2)}"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    begin = time.monotonic()
    with Cluster(tmp_path_factory.mktemp("slurm")) as c:
        print(f"one-node Slurm cluster up in {time.monotonic() - begin:.1f} s")
        yield c


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    job = launch(tmp_path_factory.mktemp("reference"), "reference")
    assert job.rc == 0, job.log[-4000:]
    return {"state": final_state(job.checkpoint / f"step-{STEPS}"), "lineage": lineage(job.dump)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(cluster, jobid: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", jobid],
        env=cluster.env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _rank0_steps(dump) -> list[int]:
    path = dump / "batches" / "batches-rank0.txt"
    return [int(line.split()[1]) for line in path.read_text().splitlines()] if path.exists() else []


def _wait(what: str, cond, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := cond():
            return got
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


@pytest.mark.parametrize("how", ["scontrol_requeue", "time_limit"])
def test_sbatch_interrupted_and_requeued_ends_like_uninterrupted(tmp_path, cluster, reference, how):
    begin = time.monotonic()
    toml = tmp_path / "faults.toml"
    toml.write_text(JOB_TOML)
    dump = tmp_path / "out"
    (dump / "batches").mkdir(parents=True)
    out = tmp_path / "slurm.out"
    tag = uuid.uuid4().hex
    env = {
        **cluster.env,
        "OMP_NUM_THREADS": "1", "CHECK_JOB": "0", "NGPU": "2", "LOG_RANK": "0,1",
        "CONFIG_FILE": str(toml), "FAULT": "", "FAULT_LOG": str(dump / "batches"),
        "FAULT_JOB": tag, "RDZV_PORT": str(_free_port()), "MAX_RESTARTS": "0",
    }  # fmt: skip
    jobid = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0",
         f"--cpus-per-task={cluster.cpus}", f"--output={out}",
         str(SBATCH), "--dump_folder", str(dump)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip().split(";")[0]  # fmt: skip
    try:
        _wait(f"rank 0 to train step {INTERRUPT_AT}",
              lambda: max(_rank0_steps(dump), default=0) >= INTERRUPT_AT, 300)  # fmt: skip
        if how == "scontrol_requeue":
            cmd = ["scontrol", "requeue", jobid]
        else:
            cmd = ["scancel", *time_limit_signal(), jobid]
        subprocess.run(cmd, env=cluster.env, check=True)
        signalled = time.monotonic()

        # Requeued: the first run's processes have all ended (Slurm's completing
        # phase) and the job waits for its begin time (cred_expire + 1 s).
        first = _wait("the job to be requeued",
                      lambda: (j := _job(cluster, jobid))["JobState"] not in
                      ("RUNNING", "COMPLETING", "REQUEUED") and j, 60)  # fmt: skip
        assert first["JobState"] == "PENDING", (first, out.read_text()[-4000:])
        requeued_after = time.monotonic() - signalled
        assert first["Restarts"] == "1", first
        assert not _job_pids(tag), "a process of the first run outlived it"
        trained_first = _rank0_steps(dump)

        done = _wait("the requeued job to end",
                     lambda: (j := _job(cluster, jobid))["JobState"] in
                     ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") and j, 400)  # fmt: skip
        log = out.read_text()
        assert done["JobState"] == "COMPLETED" and done["ExitCode"] == "0:0", (done, log[-4000:])
        assert done["Restarts"] == "1", done
    finally:
        subprocess.run(["scancel", jobid], env=cluster.env, check=False)
    deadline = time.monotonic() + 10
    while (left := _job_pids(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of the job alive 10 s after it: {left}"

    assert f"job {jobid} (restart 0)" in log and f"job {jobid} (restart 1)" in log, log[-4000:]
    preempted = re.search(r"every rank saved step (\d+)", log)
    assert preempted, f"the first run did not save on the signal: {log[-4000:]}"
    saved = int(preempted.group(1))
    assert saved >= INTERRUPT_AT and trained_first == list(range(1, saved + 1)), trained_first
    # The requeued run resumed at saved + 1: every step trained once, none lost.
    assert _rank0_steps(dump) == list(range(1, STEPS + 1)), _rank0_steps(dump)
    bad = differences(final_state(dump / "checkpoint" / f"step-{STEPS}"), reference["state"])
    assert not bad, f"{len(bad)} entries differ from the uninterrupted run, e.g. {bad[:5]}"
    assert lineage(dump) == reference["lineage"], "the batches differ from the uninterrupted run's"
    print(f"{how}: step {saved} saved, requeued {requeued_after:.1f} s after the signal, "
          f"job done in {time.monotonic() - begin:.0f} s")  # fmt: skip
