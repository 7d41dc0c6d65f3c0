"""End-to-end check of the launcher stack on TorchTitan's qwen3 debug model.

run_train.sh -> torchrun -> python -m torchtitan_nemotron3.train -> TOML loader ->
cpu_compat -> Trainer, with 1 process and with 2 (FSDP over gloo). Independent of
the NemotronH model, so an infrastructure regression shows up here on its own.
"""

import math
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


def test_one_process_trains(tmp_path):
    losses = run_training(QWEN3_TOML, 1, ["--training.steps", "5"], tmp_path)
    assert len(losses) == 5
    assert abs(losses[0] - math.log(2048)) < 0.5  # uniform over the vocabulary
    assert losses[-1] < losses[0] - 0.5


def test_two_processes_fsdp_gloo(tmp_path):
    losses = run_training(QWEN3_TOML, 2, ["--training.steps", "3"], tmp_path)
    assert len(losses) == 3
    assert losses[-1] < losses[0]
    log = (tmp_path / "train.log").read_text()
    assert "dp_shard=2" in log


def test_failure_reports_log(tmp_path):
    with pytest.raises(RuntimeError, match="unknown key 'stepz'"):
        run_training(QWEN3_TOML, 1, ["--training.stepz", "5"], tmp_path)
