"""``CONFIG_FILE=train_configs/debug_sft.toml ./run_train.sh --checkpoint.enable`` on
CPU: the assistant-token loss falls by >= 30%, the held-out validation loss
(TorchTitan's validator on the validation split) falls too, and the log reports
packing. Then ``scripts/generate.py --config_file train_configs/debug_sft.toml`` (the
same overrides, nothing else) samples from the run's newest checkpoint with the
run's architecture, tokenizer and chat template."""

import importlib.util
import re

import pytest
from _harness import REPO_ROOT, run_training

_VALIDATE = re.compile(r"validate step:\s*(\d+)\s+loss:\s*([0-9.]+)")
JOB = REPO_ROOT / "train_configs" / "debug_sft.toml"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft_run")
    overrides = [
        "--training.steps", "8", "--validator.freq", "4",
        "--checkpoint.enable", "--checkpoint.interval", "4",
        "--dump_folder", str(tmp / "outputs"),
    ]  # fmt: skip
    losses = run_training(JOB, 1, overrides, tmp)
    return losses, tmp, overrides


def test_debug_sft_learns(sft_run):
    losses, tmp_path, _ = sft_run
    assert len(losses) == 8
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last <= 0.7 * first, losses
    log = re.sub(r"\x1b\[[0-9;]*m", "", (tmp_path / "train.log").read_text())
    validation = [float(v) for _, v in _VALIDATE.findall(log)]
    assert len(validation) == 3 and validation[-1] <= 0.7 * validation[0], validation
    assert re.search(
        r"\[chat sft\] rank 0: \d+ rows of 256: packing efficiency (9\d|8\d)\.\d%", log
    )


def test_generate_from_the_job_file_alone(sft_run, capsys):
    """The job file (and the run's overrides) give what the explicit paths give:
    the newest complete checkpoint (step-8, not step-4 nor an interrupted step-12),
    the flavor, the tokenizer and its ChatML template."""
    from torchtitan_nemotron3.sft.assets import ensure_debug_sft_assets

    _, tmp, overrides = sft_run
    (tmp / "outputs" / "checkpoint" / "step-12").mkdir()  # a save without .metadata
    spec = importlib.util.spec_from_file_location("gen", REPO_ROOT / "scripts/generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    prompt = ["--prompt", "Which month comes after March?", "--greedy"]
    prompt += ["--max_new_tokens", "12"]
    assert gen.main(["--config_file", str(JOB), *prompt, *overrides]) == 0
    from_job, err = capsys.readouterr()
    assert f"checkpoint: {tmp / 'outputs' / 'checkpoint' / 'step-8'}\n" in err
    assert from_job.strip()
    explicit = [
        "--checkpoint", str(tmp / "outputs" / "checkpoint" / "step-8"),
        "--flavor", "debugmodel", "--tokenizer", ensure_debug_sft_assets()[0],
    ]  # fmt: skip
    assert gen.main([*explicit, *prompt]) == 0
    assert capsys.readouterr().out == from_job
    # Without the job, the step's DCP folder has no tokenizer: the old one-line error.
    assert gen.main([*explicit[:4], *prompt]) == 1
    assert "no tokenizer files in" in capsys.readouterr().err
