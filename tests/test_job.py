"""``torchtitan_nemotron3.job``: a TOML job file read as ``run_train.sh`` reads it
(file, then overrides), and what the steps after training take from it."""

import pytest

from torchtitan_nemotron3.job import (
    ConfigError,
    latest_checkpoint,
    load_job,
    lora_alpha,
    model_args,
    resolve_checkpoint,
    tokenizer_dir,
)
from torchtitan_nemotron3.model import flavor_args
from torchtitan_nemotron3.sft.assets import ensure_debug_sft_assets

JOB = "train_configs/debug_lora.toml"


@pytest.fixture(scope="module")
def lora_job(tmp_path_factory):
    dump = tmp_path_factory.mktemp("job")
    return load_job(JOB, ["--dump_folder", str(dump), "--checkpoint.folder", "ck"])


def test_file_then_overrides(lora_job, tmp_path):
    assert lora_job.training.steps == 30  # the file's
    assert lora_job.checkpoint.folder == "ck"  # the override's
    assert model_args(lora_job) == flavor_args("debugmodel")
    assert lora_alpha(lora_job) == 16.0
    assert tokenizer_dir(lora_job) == ensure_debug_sft_assets()[0]
    with pytest.raises(ConfigError, match=r"unknown key 'training.stepz'.*'training.steps'"):
        load_job(JOB, ["--training.stepz", "3"])
    with pytest.raises(ConfigError, match="job file not found"):
        load_job(tmp_path / "missing.toml")


def test_latest_complete_checkpoint(lora_job):
    folder = lora_job.dump_folder + "/ck"
    assert latest_checkpoint(lora_job) is None
    with pytest.raises(FileNotFoundError, match=f"no complete checkpoint .* in {folder}"):
        resolve_checkpoint(lora_job, None)
    assert resolve_checkpoint(lora_job, "given") == "given"
    import pathlib

    for name, complete in [("step-9", True), ("step-10", True), ("step-30", False),
                           ("step-x", True), ("notstep-40", True)]:  # fmt: skip
        d = pathlib.Path(folder, name)
        d.mkdir(parents=True)
        if complete:
            (d / ".metadata").write_bytes(b"")
    assert latest_checkpoint(lora_job) == pathlib.Path(folder, "step-10")  # 10 > 9
    assert resolve_checkpoint(lora_job, None) == f"{folder}/step-10"
