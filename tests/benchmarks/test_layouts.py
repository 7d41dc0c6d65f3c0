"""benchmarks/layouts.py prints one row per layout: the layouts the package
applies are measured by the dry run, the others computed, and both agree where
both exist."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import layouts


def test_prints_a_row_per_layout(capsys):
    table = layouts.main([])
    out = capsys.readouterr().out
    rows = [
        line for line in out.splitlines() if line.startswith("| ") and " | " in line
    ]
    assert [r.split(" | ")[0].strip("| ") for r in rows[1:]] == list(layouts.LAYOUTS)
    fsdp, ep8, ep8_tp2 = table
    assert fsdp["source"] == ep8["source"] == "measured"
    assert "agree to 0.00%" in fsdp["note"] and "agree to 0.00%" in ep8["note"]
    assert ep8_tp2["source"] in ("measured", "analytic")
    # EP keeps experts in place: far less traffic than FSDP-only, same state.
    assert ep8["traffic"].total < fsdp["traffic"].total / 4
    assert ep8["mem"].state == fsdp["mem"].state
    assert "GB/s" in out and "MFU" in out
