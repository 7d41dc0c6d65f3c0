"""A rank's failure, recorded once in torchrun's error file and named once by the
launcher (``launch.py``).

Under torchrun every rank that raises used to print its whole traceback, and the
other ranks the tracebacks of what followed (a peer's closed connection), in
every attempt; then torchrun printed them all again, choosing the "first"
failure by whole-second timestamps (a tie picks the lower rank, often a
consequence). Here a rank writes its exception to its error file
(``TORCHELASTIC_ERROR_FILE``, torchrun's format plus ``where``) and logs one line
without the message; the launcher reads the files and names the root cause.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import sysconfig
import time
import traceback
from dataclasses import dataclass

# A rank whose peer died sees these: a consequence, not a cause.
PEER_LOST = re.compile(
    r"Connection closed by peer|Connection reset by peer|remote worker crash|"
    r"Broken pipe|ECONNRESET|recvBytes.*closed",
    re.I,
)
_LIBRARY_DIRS = tuple(
    p for p in {sysconfig.get_paths().get("stdlib"), sysconfig.get_paths().get("purelib"),
                sysconfig.get_paths().get("platlib")} if p
)  # fmt: skip


def _short(path: str) -> str:
    """``path`` relative to the working directory when under it, a library's
    from its package."""
    if "-packages/" in path:
        return path.split("-packages/", 1)[1]
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def where(tb) -> str:
    """``file:line in function`` of the raise, and of the innermost frame of the
    job's own code when the raise is inside a library."""
    frames = traceback.extract_tb(tb)
    if not frames:
        return ""
    last = frames[-1]
    text = f"{_short(last.filename)}:{last.lineno} in {last.name}"
    own = [f for f in frames if not f.filename.startswith(_LIBRARY_DIRS)]
    if own and own[-1] is not last:
        f = own[-1]
        text += f", called from {_short(f.filename)}:{f.lineno} in {f.name}"
    return text


def record_rank_failure(error: BaseException, rank: int) -> str | None:
    """Write ``error`` to this rank's torchrun error file (the whole traceback,
    its notes, where it was raised) and return the file (None: not under torchrun).
    Call inside the ``except`` block."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return None
    notes = [str(n) for n in getattr(error, "__notes__", [])]
    data = {
        "message": {
            "message": f"{type(error).__name__}: {error}",
            "extraInfo": {
                "py_callstack": traceback.format_exc(),
                "timestamp": str(int(time.time())),
                "where": where(error.__traceback__),
                "notes": notes,
                "rank": rank,
            },
        }
    }
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
    return path


def report_rank_failure(error: BaseException) -> bool:
    """Under torchrun: record ``error`` (``record_rank_failure``) and log one line
    naming its type and where, not its message (the launcher prints the root
    cause once, at the end); False when not under torchrun (let it raise)."""
    rank = int(os.environ.get("RANK", "0"))
    path = record_rank_failure(error, rank)
    if path is None:
        return False
    from torchtitan.tools.logging import logger

    logger.error(
        f"rank {rank} failed: {type(error).__name__} at {where(error.__traceback__)}; "
        f"traceback in {path} (the launcher names the root cause at the end)"
    )
    return True


@dataclass
class Failure:
    """One rank's failure in one attempt, as the launcher sees it."""

    rank: int
    exitcode: int
    error_file: str | None  # None: the rank wrote none (a signal, or no raise)
    message: str = ""  # "Type: text" (first line only kept for display)
    where: str = ""
    notes: tuple[str, ...] = ()
    time: float = float("inf")  # the error file's mtime, else when torchrun saw the exit
    stack: str = ""  # the traceback the rank recorded

    @classmethod
    def read(cls, rank: int, exitcode: int, error_file: str | None,
             seen: float = float("inf")) -> Failure:  # fmt: skip
        """``seen``: when torchrun found the process dead (its ``ProcessFailure``
        timestamp: whole seconds, floored), for a rank without an error file."""
        if not error_file or not os.path.isfile(error_file):
            return cls(rank, exitcode, None, time=seen)
        try:
            with open(error_file) as f:
                data = json.load(f)
            mtime = os.stat(error_file).st_mtime
        except (OSError, ValueError):
            return cls(rank, exitcode, error_file, time=seen)
        message = data.get("message", "")
        if isinstance(message, str):
            return cls(rank, exitcode, error_file, message, time=mtime)
        info = message.get("extraInfo", {})
        stack = info.get("py_callstack", "")
        place = info.get("where") or _where_from_text(stack)
        return cls(rank, exitcode, error_file, str(message.get("message", "")), place,
                   tuple(info.get("notes", ())), mtime, str(stack))  # fmt: skip

    @property
    def signal(self) -> str | None:
        if self.exitcode >= 0:
            return None
        try:
            return signal.Signals(-self.exitcode).name
        except ValueError:
            return f"signal {-self.exitcode}"

    @property
    def consequence(self) -> bool:
        """Stopped by the launcher (SIGTERM) or failed because a peer died."""
        return self.exitcode == -signal.SIGTERM or bool(PEER_LOST.search(self.message))

    def kind(self) -> str:
        """The short form: exception type or signal, no message."""
        if self.message:
            return self.message.split(":", 1)[0]
        return self.signal or f"exit code {self.exitcode}"

    def cause(self) -> str:
        """The exception line (first line of the message), or the signal."""
        if self.message:
            return self.message.strip().splitlines()[0]
        if self.signal:
            return f"killed by {self.signal} (no Python exception: killed from outside)"
        return f"exit code {self.exitcode} without a recorded exception"


    def frames(self) -> list[str]:
        """The recorded traceback up to its last exception line (printed apart)."""
        lines = self.stack.rstrip().splitlines()
        head = self.cause()
        if head in lines:
            lines = lines[: len(lines) - 1 - lines[::-1].index(head)]
        return lines


def _where_from_text(stack: str) -> str:
    found = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', stack)
    if not found:
        return ""
    path, line, fn = found[-1]
    return f"{_short(path)}:{line} in {fn}"


def root_cause(failures: list[Failure]) -> Failure:
    """The failure that started the others: not a consequence (torchrun's SIGTERM
    to the survivors, a peer's closed connection) if any; then the earliest, by
    error-file mtime (not torchrun's whole seconds) or, for a rank that wrote none
    (killed), when torchrun saw it dead: a rank SIGKILLed from outside is seen at
    once, one frozen and SIGKILLed by torchrun after its grace period is seen last."""
    order = {id(f): i for i, f in enumerate(failures)}
    return min(failures, key=lambda f: (f.consequence, f.time, order[id(f)]))


def attempt_line(attempt: int, failures: list[Failure]) -> str:
    """One line per failed attempt: which ranks failed how, no messages."""
    ranks = ", ".join(f"rank {f.rank} {f.kind()} (exit {f.exitcode})"
                      for f in sorted(failures, key=lambda f: f.rank))  # fmt: skip
    return f"attempt {attempt} failed: {ranks}"


def summary(attempts: list[list[Failure]], *, succeeded: bool) -> list[str]:
    """The end-of-job report: each distinct root cause once (exception line,
    where, notes, and for a failed job its traceback), with the attempts it ended."""
    causes: dict[tuple[str, str], list[tuple[int, Failure]]] = {}
    for i, failures in enumerate(attempts):
        if failures:
            cause = root_cause(failures)
            causes.setdefault((cause.cause(), cause.where), []).append((i, cause))
    n = len(attempts)
    done = f"finished after {n - 1} restart(s)" if succeeded else f"FAILED after {n} attempt(s)"
    lines = [f"{done}; root cause{'s' if len(causes) > 1 else ''}"
             f"{' of the failed attempts' if succeeded else ''}:"]
    for (text, place), seen in sorted(causes.items(), key=lambda kv: kv[1][-1][0]):
        which = ", ".join(str(i) for i, _ in seen)
        last = seen[-1][1]
        lines.append(f"  rank {last.rank} (attempt{'s' if len(seen) > 1 else ''} {which}): {text}")
        if place:
            lines.append(f"    at {place}")
        lines += [f"    {note}" for note in last.notes]
        if last.error_file and last.stack and not succeeded:
            lines.append(f"    traceback ({last.error_file}):")
            lines += [f"      {line}" for line in last.frames()]
        elif last.error_file:
            lines.append(f"    traceback: {last.error_file}")
    return lines


def print_lines(lines: list[str], prefix: str = "[launch] ") -> None:
    for line in lines:
        print(prefix + line, file=sys.stderr, flush=True)
