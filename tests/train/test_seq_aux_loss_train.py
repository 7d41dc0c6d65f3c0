"""The sequence-level MoE balance loss from the job file, through the real
trainer: off unless asked; with ``--moe_seq_aux_loss_coeff 1e-4`` it is logged
separately and the logged loss stays the LM loss (the aux term only joins the
gradients)."""

import re

import pytest
from _harness import run_training, write_fp32_debug_toml

from torchtitan_nemotron3.model import flavor_args


@pytest.mark.integration
def test_seq_aux_loss_is_logged_and_changes_training(tmp_path):
    toml = write_fp32_debug_toml(tmp_path / "debug.toml")
    steps = ["--training.steps", "3"]
    off = run_training(toml, 1, steps, tmp_path / "off")
    on = run_training(
        toml, 1, [*steps, "--moe_seq_aux_loss_coeff", "1e-4"], tmp_path / "on"
    )
    assert "moe_seq_aux_loss" not in (tmp_path / "off" / "train.log").read_text()
    logged = re.findall(
        r"moe_seq_aux_loss:\s*([0-9.eE+-]+)",
        (tmp_path / "on" / "train.log").read_text(),
    )
    assert len(logged) == 3
    # about 1e-4 per MoE layer near balance (top-k picks the larger scores, so
    # Σ f·P is about 1 per row), summed over the layers
    n_moe = flavor_args("debugmodel").hybrid_override_pattern.count("E")
    assert all(0.9e-4 * n_moe <= float(v) < 2e-4 * n_moe for v in logged), logged
    assert on[0] == off[0]  # step 1's loss is computed before any update
    assert on[1:] != off[1:]  # its gradient moved the weights
