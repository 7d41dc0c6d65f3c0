"""The launcher harness itself (log parsing, entry point, failure reporting), on
TorchTitan's qwen3 debug model so it does not depend on the NemotronH model.

Training through run_train.sh on 1 and 2 ranks is covered by test_e2e_train.py.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from _harness import REPO_ROOT, parse_step_losses, run_training

QWEN3_TOML = Path(__file__).with_name("qwen3_tiny.toml")


def test_parse_step_losses_strips_colors():
    log = (
        "[rank0]:[titan] ... \x1b[31mstep:  1  \x1b[32mloss:  7.69605  grad_norm: 5.0\n"
        "[rank0]:[titan] ... \x1b[31mstep:  2  \x1b[32mloss:  7.00588  grad_norm: 3.5\n"
        "[rank0]:[titan] ... step: 2 loss: 9.0 (a second rank, ignored)\n"
    )
    assert parse_step_losses(log) == {1: 7.69605, 2: 7.00588}


def test_entry_point_help():
    out = subprocess.run(
        [sys.executable, "-m", "torchtitan_nemotron3.train", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--config_file" in out


def test_failure_reports_log(tmp_path):
    with pytest.raises(RuntimeError, match="unknown key 'training.stepz'"):
        run_training(QWEN3_TOML, 1, ["--training.stepz", "5"], tmp_path)
