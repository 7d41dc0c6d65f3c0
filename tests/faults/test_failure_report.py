"""The failure report (``resilience/failure.py``): what a rank records in its
torchrun error file, which failure of an attempt is the root cause, and that the
end-of-job summary names each cause once. In-process; the real launcher is
checked by ``test_faults.py`` (crash loop, sleeping rank)."""

from __future__ import annotations

import json
import os
import signal

from torch.distributed.elastic.multiprocessing.errors import (
    ChildFailedError,
    ProcessFailure,
)

from torchtitan_nemotron3.resilience.failure import (
    Failure,
    attempt_line,
    record_rank_failure,
    root_cause,
    summary,
)


def _raise_here():
    raise RuntimeError("the real bug")


def _record(path, monkeypatch, error_factory, note=None, rank=1):
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    try:
        error_factory()
    except Exception as e:
        if note:
            e.add_note(note)
        assert record_rank_failure(e, rank) == str(path)
    return path


def _peer_lost():
    raise RuntimeError(
        "[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1. "
        "This is typically caused by a remote worker crashing."
    )


def test_rank_records_its_exception_where_and_notes(tmp_path, monkeypatch):
    path = _record(tmp_path / "error.json", monkeypatch, _raise_here, note="a note")
    data = json.loads(path.read_text())["message"]
    assert data["message"] == "RuntimeError: the real bug"
    assert "Traceback" in data["extraInfo"]["py_callstack"]
    int(data["extraInfo"]["timestamp"])  # torchrun reads it as an int
    # torchrun itself can read the file
    assert ProcessFailure(1, 1, 1, str(path)).message["message"] == "RuntimeError: the real bug"
    f = Failure.read(1, 1, str(path))
    assert f.cause() == "RuntimeError: the real bug"
    line = _raise_here.__code__.co_firstlineno + 1
    assert f.where.endswith(f"test_failure_report.py:{line} in _raise_here"), f.where
    assert f.notes == ("a note",) and not f.consequence


def test_not_under_torchrun_records_nothing(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    try:
        _raise_here()
    except RuntimeError as e:
        assert record_rank_failure(e, 0) is None


def test_root_cause_is_not_the_consequence(tmp_path, monkeypatch):
    """Rank 0 loses its peer (error file written first, the same second) and rank 1
    has the bug: the bug is the root cause. torchrun's own choice (whole-second
    timestamps, ties to the lower rank) names rank 0's lost connection."""
    peer = _record(tmp_path / "0.json", monkeypatch, _peer_lost, rank=0)
    bug = _record(tmp_path / "1.json", monkeypatch, _raise_here, rank=1)
    for p in (peer, bug):  # the same second, as torchrun sees them
        data = json.loads(p.read_text())
        data["message"]["extraInfo"]["timestamp"] = "1000"
        p.write_text(json.dumps(data))
    os.utime(peer, (1000.1, 1000.1))
    os.utime(bug, (1000.2, 1000.2))
    failures = [Failure.read(0, 1, str(peer)), Failure.read(1, 1, str(bug))]
    assert failures[0].consequence
    assert root_cause(failures).rank == 1
    torchrun = ChildFailedError("train", {0: ProcessFailure(0, 10, 1, str(peer)),
                                          1: ProcessFailure(1, 11, 1, str(bug))})
    assert torchrun.get_first_failure()[0] == 0  # what this report fixes


def test_root_cause_signal_and_timeout(tmp_path, monkeypatch):
    peer = _record(tmp_path / "0.json", monkeypatch, _peer_lost, rank=0)
    os.utime(peer, (1000.5, 1000.5))
    # Rank 1 SIGKILLed from outside (no exception; torchrun saw it dead in second
    # 1000), rank 0 then lost its peer: the kill is the root cause.
    killed = Failure.read(1, -signal.SIGKILL, None, seen=1000)
    cause = root_cause([Failure.read(0, 1, str(peer)), killed])
    assert cause is killed and "SIGKILL" in cause.cause()

    def odd():
        raise RuntimeError("an error this report does not know as a consequence")

    # ... also when the survivor's error is one not known as a consequence
    other = _record(tmp_path / "o.json", monkeypatch, odd, rank=0)
    os.utime(other, (1000.5, 1000.5))
    assert root_cause([Failure.read(0, 1, str(other)), killed]) is killed

    def timeout():
        raise RuntimeError("Timed out waiting 10000ms for recv operation to complete")

    waited = _record(tmp_path / "t.json", monkeypatch, timeout, rank=0)
    os.utime(waited, (1000.5, 1000.5))
    # A frozen rank SIGKILLed by torchrun after its 30 s grace (seen at 1031), or a
    # sleeper stopped by its SIGTERM: the waiting rank's timeout is the root cause.
    frozen = Failure.read(1, -signal.SIGKILL, None, seen=1031)
    sleeper = Failure.read(1, -signal.SIGTERM, None, seen=1001)
    for late in (frozen, sleeper):
        assert root_cause([late, Failure.read(0, 1, str(waited))]).rank == 0


def test_summary_names_each_cause_once(tmp_path, monkeypatch):
    bug = [_record(tmp_path / f"{a}.json", monkeypatch, _raise_here) for a in range(3)]
    peer = _record(tmp_path / "p.json", monkeypatch, _peer_lost, rank=0)
    attempts = [[Failure.read(0, -15, str(peer)), Failure.read(1, 1, str(b))] for b in bug]
    lines = summary(attempts, succeeded=False)
    text = "\n".join(lines)
    assert text.count("RuntimeError: the real bug") == 1 and "Connection closed" not in text
    assert lines[0] == "FAILED after 3 attempt(s); root cause:"
    assert lines[1] == "  rank 1 (attempts 0, 1, 2): RuntimeError: the real bug"
    assert lines[2].startswith("    at ") and lines[3] == f"    traceback ({bug[2]}):"
    # the root cause's traceback, once, without its exception line (printed above)
    assert lines[4] == "      Traceback (most recent call last):", lines
    assert "in _raise_here" in text and text.count("Traceback") == 1
    assert attempt_line(0, attempts[0]) == (
        "attempt 0 failed: rank 0 RuntimeError (exit -15), rank 1 RuntimeError (exit 1)"
    )
    # Two different causes: each once, the last attempt's last.
    killed = [Failure.read(1, -signal.SIGKILL, None)]
    lines = summary([killed, attempts[0], killed], succeeded=False)
    assert lines[0] == "FAILED after 3 attempt(s); root causes:"
    assert lines[1] == "  rank 1 (attempt 1): RuntimeError: the real bug"
    assert lines[-1].startswith("  rank 1 (attempts 0, 2): killed by SIGKILL")
    # A run that recovered names what its failed attempts died of.
    lines = summary([attempts[0], []], succeeded=True)
    assert lines[0] == "finished after 1 restart(s); root cause of the failed attempts:"
