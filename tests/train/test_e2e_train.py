"""End-to-end NemotronH training through run_train.sh (CPU/gloo without CUDA).

Written against ``torchtitan_nemotron3.config_registry.nemotron3_debugmodel``.
Each run is a few steps of the debug model (seconds per step on 2 CPU cores).
"""

import importlib.util
import math

import pytest
from _harness import run_training

if importlib.util.find_spec("torchtitan_nemotron3.config_registry") is None:
    pytest.skip(
        "torchtitan_nemotron3.config_registry does not exist yet (the NemotronH "
        "model and its config functions have not landed)",
        allow_module_level=True,
    )

DEBUG_TOML = """\
[job]
config = "nemotron3_debugmodel"
debug_assets = true

[training]
local_batch_size = 4
seq_len = 256

[metrics]
log_freq = 1
"""


@pytest.fixture
def debug_toml(tmp_path):
    path = tmp_path / "nemotron3_debug.toml"
    path.write_text(DEBUG_TOML)
    return path


def test_debugmodel_one_process_loss_drops(debug_toml, tmp_path):
    losses = run_training(debug_toml, 1, ["--training.steps", "4"], tmp_path / "run")
    assert len(losses) == 4
    assert abs(losses[0] - math.log(2048)) < 1.0
    assert min(losses[-2:]) < losses[0] - 1.0


def test_debugmodel_two_processes_fsdp(debug_toml, tmp_path):
    losses = run_training(debug_toml, 2, ["--training.steps", "3"], tmp_path / "run")
    assert len(losses) == 3
    assert losses[-1] < losses[0]
    assert "dp_shard=2" in (tmp_path / "run" / "train.log").read_text()


def test_debugmodel_checkpoint_resume(debug_toml, tmp_path):
    dump = tmp_path / "outputs"
    ckpt = [
        "--dump_folder",
        str(dump),
        "--checkpoint.enable",
        "--checkpoint.interval",
        "2",
    ]
    ckpt += [
        "--training.seq_len",
        "128",
        "--training.local_batch_size",
        "2",
    ]  # 2 launches
    first = run_training(
        debug_toml, 1, ["--training.steps", "2", *ckpt], tmp_path / "a"
    )
    assert len(first) == 2
    assert (dump / "checkpoint" / "step-2").is_dir()

    resumed = run_training(
        debug_toml, 1, ["--training.steps", "4", *ckpt], tmp_path / "b"
    )
    log = (tmp_path / "b" / "train.log").read_text()
    assert "Training starts at step 3" in log
    assert len(resumed) == 2  # steps 3 and 4 only
