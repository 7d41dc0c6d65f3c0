"""Non-finite loss / gradient norm: the run stops before the step's update and
checkpoint, or skips the update when ``nonfinite.action = "skip"``.

The integration tests train the debug model through ``torchrun -m torchtitan.train``
with the test config of ``nonfinite_config`` (NaN/inf injected at chosen steps,
a checkpoint with optimizer state after every step) and read the checkpoints back.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _harness import parse_step_losses
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = [
    "--module",
    "tests.train.nonfinite_config",
    "--config",
    "nemotron3_debug_nonfinite",
]
NON_MODEL = ("train_state", "optimizer", "dataloader", "lr_scheduler", "rng")  # rng: per-rank generators


# ------------------------------------------------------------------------- unit


def test_config_builds_its_trainer_and_parses_from_the_command_line():
    from torchtitan.config import ConfigManager

    from tests.train.nonfinite_config import NaNInjectingTrainer
    from torchtitan_nemotron3.train.trainer import NemotronHTrainer

    assert NemotronHTrainer.Config._owner is NemotronHTrainer
    assert NemotronHTrainer.Config().nonfinite.action == "stop"
    overrides = "--nonfinite.action skip --nonfinite.max_consecutive_skips 3"
    config = ConfigManager().parse_args(
        [*CONFIG, *overrides.split(), "--inject.loss_steps", "2", "5"]
    )
    assert type(config)._owner is NaNInjectingTrainer
    assert config.nonfinite.action == "skip"
    assert config.nonfinite.max_consecutive_skips == 3
    assert config.inject.loss_steps == [2, 5]
    assert config.to_dict()["nonfinite"] == {
        "action": "skip",
        "max_consecutive_skips": 3,
    }
    with pytest.raises(SystemExit):
        ConfigManager().parse_args([*CONFIG, "--nonfinite.action", "ignore"])


# ------------------------------------------------------------------ integration


def _train(dump: Path, *overrides: str, nproc: int = 1, timeout: float = 300):
    """``torchrun -m torchtitan.train`` with the test config; (returncode, log)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(nproc), "-m", "torchtitan.train",
        *CONFIG, "--dump_folder", str(dump), *overrides,
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    proc = subprocess.run(  # noqa: PLW1510 (callers check the return code)
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )  # fmt: skip
    (dump.parent / f"{dump.name}.log").write_text(proc.stdout)
    return proc.returncode, proc.stdout


def _saved_steps(dump: Path) -> list[int]:
    folder = dump / "checkpoint"
    if not folder.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*"))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _load(dump: Path, step: int) -> dict:
    """A DCP checkpoint as one flat dict ("optimizer.state.<fqn>.exp_avg", ...)."""
    out = dump.parent / f"{dump.name}-step-{step}.pt"
    dcp_to_torch_save(dump / "checkpoint" / f"step-{step}", out)
    return _flat(torch.load(out, weights_only=False))


def _model(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith(NON_MODEL)}


def _assert_finite(tensors: dict) -> None:
    bad = [
        k
        for k, v in tensors.items()
        if isinstance(v, torch.Tensor)
        and v.is_floating_point()
        and not v.isfinite().all()
    ]
    assert not bad, f"non-finite tensors: {bad[:5]}"


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, f"changed: {changed[:5]}"


def _assert_skip_discards_expert_counts(dump: Path, updated: list[int], steps: int):
    """What ``nonfinite_config`` recorded of each MoE layer's ``tokens_per_expert_E``:
    zero after every step, skipped or not, and at each routing-bias update exactly
    one step's routed tokens (batch × seq_len × top_k per layer, times the passes
    of the routing per step: the debug config's selective AC recomputes it in the
    backward, which counts each token twice; the sign-based update does not care):
    a skipped step's counts must not leak into the next update."""
    from tests.train.nonfinite_config import nemotron3_debug_nonfinite
    from torchtitan_nemotron3.hf.config import args_from_model_config

    config = nemotron3_debug_nonfinite()
    top_k = args_from_model_config(config.model_spec.model).num_experts_per_tok
    routed = config.training.local_batch_size * config.training.seq_len * top_k
    lines = (dump / "expert_counts.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    after = {e["step"]: e["counts"] for e in events if e["event"] == "after_step"}
    update = {e["step"]: e["counts"] for e in events if e["event"] == "update"}
    assert sorted(after) == list(range(1, steps + 1))
    assert sorted(update) == updated
    for step, counts in after.items():
        assert counts and all(c == 0 for cs in counts.values() for c in cs), step
    passes = sum(update[updated[0]][next(iter(update[updated[0]]))]) / routed
    assert passes in (1, 2), passes
    for step, counts in update.items():
        assert {layer: sum(cs) for layer, cs in counts.items()} == dict.fromkeys(
            counts, routed * passes
        ), step


@pytest.mark.integration
def test_stop_before_update_and_checkpoint(tmp_path):
    """Default action: a NaN loss at step 3 ends the run with an error naming the
    step; checkpoints of steps 1-2 only, all finite."""
    dump = tmp_path / "run"
    rc, log = _train(dump, "--training.steps", "5", "--inject.loss_steps", "3")
    assert rc != 0, log[-3000:]
    assert (
        "NonFiniteError: non-finite loss at step 3: stopped before the optimizer step"
        in log
    )
    assert "--nonfinite.action skip" in log
    assert _saved_steps(dump) == [1, 2]
    _assert_finite(_load(dump, 2))


@pytest.mark.integration
def test_skip_leaves_weights_and_optimizer_unchanged(tmp_path):
    """action "skip": a NaN loss (step 2) and an inf gradient (step 4) each leave
    the weights and the optimizer state bit for bit as they were; the LR schedule
    and the step advance; the run completes and the log counts the skips."""
    dump = tmp_path / "run"
    rc, log = _train(
        dump, "--nonfinite.action", "skip", "--training.steps", "5",
        "--inject.loss_steps", "2", "--inject.grad_steps", "4",
    )  # fmt: skip
    assert rc == 0, log[-3000:]
    assert re.search(
        r"Non-finite loss at step 2: skipped .* Skipped steps so far: 1\.", log
    )
    assert re.search(
        r"Non-finite gradient norm at step 4: skipped .* Skipped steps so far: 2\.",
        log,
    )
    losses = parse_step_losses(log)  # a skipped step logs its warning, no metrics
    assert sorted(losses) == [1, 3, 5]
    assert all(math.isfinite(loss) for loss in losses.values())
    assert _saved_steps(dump) == [1, 2, 3, 4, 5]

    sd = {step: _load(dump, step) for step in (1, 2, 3, 4, 5)}
    for before, skipped in ((1, 2), (3, 4)):
        _assert_same(_model(sd[before]), _model(sd[skipped]))
        state = [k for k in sd[before] if k.startswith("optimizer.state.")]
        assert state
        _assert_same(
            {k: sd[before][k] for k in state}, {k: sd[skipped][k] for k in state}
        )
        assert sd[skipped]["train_state.step"] == skipped
        assert sd[skipped]["lr_scheduler.last_epoch"] == skipped
    _assert_skip_discards_expert_counts(dump, updated=[1, 3, 5], steps=5)
    # and the step after a skip trains again
    assert not torch.equal(sd[5]["lm_head.weight"], sd[4]["lm_head.weight"])
    for tensors in sd.values():
        _assert_finite(tensors)


@pytest.mark.integration
def test_ranks_agree_and_consecutive_skips_stop(tmp_path):
    """2 ranks (FSDP), the loss NaN on rank 1 only: both ranks skip together, and
    the second skip in a row (max_consecutive_skips = 2) stops the run before the
    step's checkpoint."""
    dump = tmp_path / "run"
    rc, log = _train(
        dump, "--nonfinite.action", "skip", "--nonfinite.max_consecutive_skips", "2",
        "--training.steps", "4", "--inject.loss_steps", "2", "3", "--inject.rank", "1",
        nproc=2,
    )  # fmt: skip
    assert rc != 0, log[-3000:]
    assert "Non-finite loss at step 2: skipped" in log
    assert "non-finite loss at step 3, 2 skipped steps in a row" in log
    assert _saved_steps(dump) == [1, 2]
    sd1, sd2 = _load(dump, 1), _load(dump, 2)
    _assert_same(_model(sd1), _model(sd2))
    _assert_finite(sd2)
