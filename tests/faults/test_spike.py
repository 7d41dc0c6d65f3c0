"""Loss-spike guard: the rule on a plain sequence, and in a real run a step whose
loss (and gradients) are 100x is skipped so the weights and optimizer state
afterwards equal a run whose same step was dropped by the non-finite skip (a NaN
loss at that step, ``nonfinite.action = skip``): the run never took that
batch's update."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.faults._run import differences, final_state
from torchtitan_nemotron3.resilience.spike import SpikeConfig, SpikeGuard

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_rule_mean_plus_k_sigma_over_window_after_warmup():
    guard = SpikeGuard(SpikeConfig(enable=True, sigmas=3.0, window=4, warmup=3))
    assert not guard.is_spike(100.0) and not guard.is_spike(1.0)  # warm-up
    assert not guard.is_spike(1.2)
    # window [100, 1, 1.2]: mean 34.07, std 57.1 -> limit 205
    assert not guard.is_spike(2.0)
    for x in (1.0, 1.1, 0.9, 1.0):  # the window is now the last four
        assert not guard.is_spike(x)
    limit = guard.threshold()
    recent = torch.tensor([1.0, 1.1, 0.9, 1.0], dtype=torch.float64)
    assert limit == pytest.approx(float(recent.mean() + 3 * recent.std()))
    assert guard.is_spike(limit + 1e-3) and int(guard.skipped) == 1
    assert not guard.is_spike(limit - 1e-3)  # accepted, joins the window
    with pytest.raises(ValueError, match="warmup"):
        SpikeConfig(window=4, warmup=8)


def _train(dump: Path, *overrides: str) -> str:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", "1", "-m", "torchtitan.train",
        "--module", "tests.train.nonfinite_config", "--config", "nemotron3_debug_nonfinite",
        "--dump_folder", str(dump), "--training.steps", "7",
        "--checkpoint.interval", "7", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)  # fmt: skip
    (dump.parent / f"{dump.name}.log").write_text(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


@pytest.mark.integration
@pytest.mark.matrix  # two 7-step runs, ~4 min on 2 busy cores: kept out of CI
def test_spike_skipped_like_a_dropped_step(tmp_path):
    spiked = _train(
        tmp_path / "spike", "--inject.spike_steps", "5", "--spike.enable",
        "--spike.window", "4", "--spike.warmup", "3",
    )  # fmt: skip
    assert "Loss spike at step 5" in spiked and "Spikes skipped so far: 1" in spiked
    assert spiked.count("Loss spike at step") == 1
    _train(tmp_path / "dropped", "--inject.loss_steps", "5", "--nonfinite.action", "skip")
    got = final_state(tmp_path / "spike" / "checkpoint" / "step-7")
    ref = final_state(tmp_path / "dropped" / "checkpoint" / "step-7")
    keys = [k for k in ref if not k.startswith(("rng.", "dataloader."))]
    keys = [k for k in keys if k in got]
    assert any(k.startswith("optimizer.state") for k in keys)
    bad = differences({k: got[k] for k in keys}, {k: ref[k] for k in keys})
    assert not bad, bad[:5]
    assert int(got["spike.skipped"]) == 1
