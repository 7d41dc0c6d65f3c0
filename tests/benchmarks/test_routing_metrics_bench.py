"""benchmarks/routing_metrics.py runs (tiny, CPU) and prints its three rows."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import routing_metrics as bench  # noqa: E402


def test_prints_the_three_rows(capsys):
    assert bench.main(["--reps", "1", "--warmup", "0", "--seq_len", "16", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    for row in ("| off |", "| on |", "| on+heatmap |"):
        assert row in out
