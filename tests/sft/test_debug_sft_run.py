"""``CONFIG_FILE=train_configs/debug_sft.toml ./run_train.sh`` on CPU: the
assistant-token loss falls by >= 30%, the held-out validation loss (TorchTitan's
validator on the validation split) falls too, and the log reports packing."""

import re

import pytest
from _harness import REPO_ROOT, run_training

_VALIDATE = re.compile(r"validate step:\s*(\d+)\s+loss:\s*([0-9.]+)")


@pytest.mark.integration
def test_debug_sft_learns(tmp_path):
    losses = run_training(
        REPO_ROOT / "train_configs" / "debug_sft.toml", 1,
        ["--training.steps", "8", "--validator.freq", "4"], tmp_path,
    )  # fmt: skip
    assert len(losses) == 8
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last <= 0.7 * first, losses
    log = re.sub(r"\x1b\[[0-9;]*m", "", (tmp_path / "train.log").read_text())
    validation = [float(v) for _, v in _VALIDATE.findall(log)]
    assert len(validation) == 3 and validation[-1] <= 0.7 * validation[0], validation
    assert re.search(
        r"\[chat sft\] rank 0: \d+ rows of 256: packing efficiency (9\d|8\d)\.\d%", log
    )
