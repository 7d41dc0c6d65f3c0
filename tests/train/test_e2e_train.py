"""End-to-end NemotronH training through run_train.sh (CPU/gloo without CUDA).

The debug model (6.8M parameters, every layer type) on the offline corpus. Runs use
fp32 parameters so that "the same loss" can be checked at fp32 precision.
"""

import math

import pytest
import torch
from _harness import copy_checkpoint, hf_weights, run_training, write_fp32_debug_toml

from torchtitan_nemotron3.model import flavor_args


@pytest.fixture(scope="module")
def debug_toml(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "nemotron3_debug.toml"
    return write_fp32_debug_toml(path)


@pytest.fixture(scope="module")
def selective_ac_losses(debug_toml, tmp_path_factory):
    """3 steps with the config's default, selective AC: the reference run."""
    return run_training(debug_toml, 1, ["--training.steps", "3"], tmp_path_factory.mktemp("ref"))


def _assert_learns(losses: list[float]) -> None:
    assert abs(losses[0] - math.log(2048)) < 1.0  # starts near uniform
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, losses


def test_debugmodel_one_process_20_steps(debug_toml, tmp_path):
    """The loss falls, and the trained weights are better by transformers' own
    forward: the HF export of step 20 scores the first batch (which step 1 logged
    from the initial weights) more than 1 nat lower, so the logged curve is the
    model's, not an artefact of the logging or of the loss code."""
    from hf.hf_checkpoints import first_batch, transformers_loss

    dump = tmp_path / "dump"
    export = [
        "--dump_folder", str(dump), "--checkpoint.enable", "--checkpoint.interval", "20",
        "--checkpoint.last_save_in_hf", "--checkpoint.last_save_model_only",
        "--checkpoint.export_dtype", "float32",
    ]  # fmt: skip
    losses = run_training(
        debug_toml, 1, ["--training.steps", "20", *export], tmp_path / "run"
    )
    assert len(losses) == 20
    _assert_learns(losses)
    trained = transformers_loss(dump / "checkpoint" / "step-20", *first_batch(128, 4))
    print("step-1 loss", losses[0], "trained weights on the same batch", trained)
    assert trained < losses[0] - 1.0, (trained, losses)


def _final_weights(dump, step) -> dict[str, torch.Tensor]:
    return hf_weights(dump / "checkpoint" / f"step-{step}", flavor_args("debugmodel"))


def test_resume_equals_uninterrupted_run_bitwise(debug_toml, tmp_path):
    """Stop after step 2, resume from its checkpoint: steps 3-4 give the same losses
    and the same final weights, bit for bit, as a run that never stopped (model,
    MoE routing bias, optimizer, LR schedule and dataloader position all restored)."""
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "2", "--training.steps", "4"]
    full_dump, resumed_dump = tmp_path / "full", tmp_path / "resumed"
    full = run_training(debug_toml, 1, [*ckpt, "--dump_folder", str(full_dump)], tmp_path / "a")

    # The interrupted run: only the step-2 checkpoint exists when it restarts.
    copy_checkpoint(full_dump, 2, resumed_dump)
    resumed = run_training(
        debug_toml, 1, [*ckpt, "--dump_folder", str(resumed_dump)], tmp_path / "b"
    )
    assert "Training starts at step 3" in (tmp_path / "b" / "train.log").read_text()
    assert resumed == full[2:]

    full_w, resumed_w = _final_weights(full_dump, 4), _final_weights(resumed_dump, 4)
    assert full_w.keys() == resumed_w.keys()
    for name, t in full_w.items():
        assert torch.equal(t, resumed_w[name]), name
    # the load-balancing hook did move the routing bias during the run
    biases = [t for n, t in full_w.items() if n.endswith("e_score_correction_bias")]
    assert biases and all(b.abs().max() > 0 for b in biases)


@pytest.mark.parametrize(
    "variant,overrides,rel_tol",
    [
        ("full AC", ["--activation_checkpoint.mode", "full"], 1e-5),
        ("no AC", ["--activation_checkpoint.mode", "none"], 1e-5),
        ("compile", ["--compile.enable", "--compile.components", "model"], 2e-4),
    ],
)
def test_ac_and_compile_change_nothing_but_cost(
    debug_toml, selective_ac_losses, tmp_path, variant, overrides, rel_tol
):
    """Selective AC is the config's default; the other modes and per-block compile
    recompute or fuse the same math: same losses (fp32 noise), and the log shows
    the requested technique was applied, not ignored."""
    ref = selective_ac_losses
    got = run_training(debug_toml, 1, ["--training.steps", "3", *overrides], tmp_path)
    assert len(got) == len(ref) == 3
    for a, b in zip(ref, got):
        assert abs(a - b) <= rel_tol * abs(a), (variant, ref, got)
    log = (tmp_path / "train.log").read_text()
    if variant == "full AC":
        assert "Applied FullAC activation checkpointing" in log
    if variant == "no AC":
        assert "activation checkpointing to the model" not in log
    if variant == "compile":
        assert "Compiling each TransformerBlock with torch.compile" in log
