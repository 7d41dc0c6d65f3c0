"""A throwaway one-node Slurm cluster on localhost, for testing the sbatch script.

Debian's Slurm and MUNGE (``apt-get install slurmctld slurmd munge``): a
``munged``, a ``slurmctld`` and a ``slurmd`` started as the current user (root:
``slurmd`` launches the job's tasks as their owner), every file they write (key,
socket, state, spool, logs, pid files) in one folder, free ports, no cgroups
(``proctrack/linuxproc``, ``task/none``), nothing of ``/etc`` read or changed.
Clients find it through ``SLURM_CONF`` (``Cluster.env``).

``AuthInfo cred_expire`` is 10 s: Slurm holds a requeued job for the credential
lifetime + 1 s before it may start again (121 s by default). ``KillWait`` stays
at Slurm's default 30 s: a job that is cancelled or requeued gets SIGTERM and,
30 s later, SIGKILL.

    python -m tests.faults.slurm_cluster start DIR   # prints SLURM_CONF=...
    python -m tests.faults.slurm_cluster stop DIR
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "sinfo")


def missing_binaries() -> list[str]:
    return [b for b in (*DAEMONS, *CLIENTS) if shutil.which(b) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """``start()`` returns once the node is idle; ``stop()`` ends every daemon
    (and with ``slurmd``, what is left of the jobs)."""

    def __init__(self, root: Path, cpus: int | None = None) -> None:
        self.root = Path(root).resolve()
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.pids: dict[str, int | None] = {}  # read at start: daemons delete the files

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        r = self.root
        user = pwd.getpwuid(os.getuid()).pw_name
        for d in ("munge", "state", f"spool/{self.node}", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o755)  # the socket is reached through it
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        ctld, slurmd = _free_port(), _free_port()
        self.conf.write_text(
            f"""\
ClusterName=throwaway
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld}
SlurmdPort={slurmd}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=30
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _run(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def start(self, timeout: float = 60) -> Self:
        missing = missing_binaries()
        if missing:
            raise RuntimeError(f"Slurm not installed: {', '.join(missing)} not found")
        try:
            socket.gethostbyname(self.node)
        except OSError as e:
            raise RuntimeError(f"this host's name {self.node!r} does not resolve: {e}") from e
        self._write_config()
        r = self.root
        m = r / "munge"
        steps = [
            ["munged", "-f", f"--socket={self.munge_socket}", f"--key-file={m}/munge.key",
             f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed",
             f"--log-file={r}/log/munged.log"],
            ["slurmctld", "-f", str(self.conf)],
            ["slurmd", "-f", str(self.conf), "-N", self.node],
        ]  # fmt: skip
        for cmd in steps:  # each daemonizes once it is listening
            proc = self._run(*cmd)
            if proc.returncode != 0:
                self.stop()
                raise RuntimeError(f"{cmd[0]} failed (rc {proc.returncode}): "
                                   f"{(proc.stderr or proc.stdout).strip()}")  # fmt: skip
            self.pids[cmd[0]] = self._pid(cmd[0])
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            proc = self._run("sinfo", "-h", "-n", self.node, "-o", "%t")
            state = proc.stdout.strip()
            if state == "idle":
                return self
            time.sleep(0.5)
        logs = "".join(p.read_text()[-2000:] for p in sorted((r / "log").glob("*.log")))
        self.stop()
        raise RuntimeError(f"node {self.node} not idle after {timeout:g} s ({state!r}):\n{logs}")

    def _pid(self, name: str) -> int | None:
        path = {"munged": self.root / "munge" / "munged.pid"}.get(name, self.root / f"{name}.pid")
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, timeout: float = 60) -> None:
        """Cancel every job and wait for its processes to end (SIGTERM, SIGKILL
        ``KillWait`` later: slurmd and munged must outlive them), then shut down
        slurmctld and slurmd, then munged; a daemon still alive is SIGKILLed."""
        deadline = time.monotonic() + timeout
        if self.pids.get("slurmctld"):
            self._run("scancel", "--quiet", "--partition", "debug")
            while time.monotonic() < deadline:
                proc = self._run("squeue", "-h", "-o", "%i")
                if proc.returncode != 0 or not proc.stdout.strip():
                    break
                time.sleep(0.5)
            self._run("scontrol", "shutdown")  # slurmctld and slurmd
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            if name == "munged":
                self._run("munged", "-s", f"--socket={self.munge_socket}")
            while time.monotonic() < deadline and _alive(pid, name):
                time.sleep(0.2)
            if _alive(pid, name):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _alive(pid: int, name: str) -> bool:
    """Whether ``pid`` is still this daemon (not a reused pid, not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    comm, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
    return name in comm and state != "Z"


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit("usage: python -m tests.faults.slurm_cluster start|stop DIR")
    cluster = Cluster(Path(sys.argv[2]))
    if sys.argv[1] == "start":
        cluster.start()
        print(f"SLURM_CONF={cluster.conf}")
    else:
        cluster.pids = {name: cluster._pid(name) for name in DAEMONS}
        cluster.stop()
