"""torchrun, reporting failures once: ``python torchtitan_nemotron3/resilience/launch.py
[torchrun arguments]`` (what ``run_train.sh`` runs; ``-m`` works too).

It is torchrun (``torch.distributed.run``: same arguments, agent, restarts and
signals) with two differences when ranks fail: each failed attempt is one line
(which rank failed how, no tracebacks: the ranks log one line each and keep the
traceback in their error file, ``failure.py``), and at the end the root cause
(the exception line, where it was raised and its traceback) is printed once, instead of
torchrun's ``ChildFailedError`` block with every rank's traceback. torchrun's
parent error file (``TORCHELASTIC_ERROR_FILE`` of the launcher, for schedulers)
receives the root cause's file, as torchrun's ``record`` does.
"""

from __future__ import annotations

import importlib.util
import os
import sys

if not __package__:  # run as a file (run_train.sh): skip the package's ~5 s of imports
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from torch.distributed.elastic.agent.server.api import WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.errors import (
    ChildFailedError,
    ErrorHandler,
)
from torch.distributed.run import parse_args, run

if __package__:
    from . import failure
else:  # no module of this folder may shadow a library's: load the file alone
    _spec = importlib.util.spec_from_file_location("_launch_failure", os.path.join(_HERE, "failure.py"))
    failure = sys.modules["_launch_failure"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(failure)
Failure, attempt_line, print_lines = failure.Failure, failure.attempt_line, failure.print_lines
root_cause, summary = failure.root_cause, failure.summary

attempts: list[list[Failure]] = []


def _failures(result) -> list[Failure]:
    return [
        Failure.read(rank, f.exitcode, None if f.error_file == "<N/A>" else f.error_file,
                     seen=f.timestamp)  # fmt: skip
        for rank, f in result.failures.items()
    ]


def _watch_attempts() -> None:
    """Record each attempt's failures as the agent sees them (its monitor result),
    before it restarts the workers."""
    monitor = LocalElasticAgent._monitor_workers

    def watched(self, worker_group):
        result = monitor(self, worker_group)
        if result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY) and result.failures:
            failures = _failures(result)
            attempts.append(failures)
            left, most = self._remaining_restarts, worker_group.spec.max_restarts
            then = f"; restarting all ranks (restart {most - left + 1} of {most})" if left else ""
            print_lines([attempt_line(len(attempts) - 1, failures) + then])
        elif result.state == WorkerState.SUCCEEDED:
            attempts.append([])
        return result

    LocalElasticAgent._monitor_workers = watched


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    handler = ErrorHandler()
    handler.initialize()
    _watch_attempts()
    try:
        run(args)
    except ChildFailedError:
        failed = [a for a in attempts if a]
        if not failed:
            raise
        print_lines(summary(attempts, succeeded=False))
        cause = root_cause(failed[-1])
        if cause.error_file and os.environ.get("TORCHELASTIC_ERROR_FILE"):
            handler.dump_error_file(cause.error_file, cause.exitcode)
        raise SystemExit(1) from None
    if any(attempts):
        print_lines(summary(attempts, succeeded=True))


if __name__ == "__main__":
    main()
