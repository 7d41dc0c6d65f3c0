"""QLoRA through the real trainer (run_train.sh, torchrun, gloo): the debug QLoRA
job trains on one rank and on two FSDP ranks; its checkpoints hold the adapters
and their optimizer only (no base tensor); a run resumed from its step-2
checkpoint (base re-derived from the seeded init) gives the uninterrupted run's
next losses exactly (to the logged digits)."""

import shutil

import pytest
from torch.distributed.checkpoint import FileSystemReader
from train._harness import REPO_ROOT, run_training

pytestmark = pytest.mark.integration

TOML = REPO_ROOT / "train_configs" / "debug_qlora.toml"
OVERRIDES = [
    "--training.local_batch_size", "2",
    "--training.seq_len", "128",
    "--validator.no_enable",
    "--checkpoint.interval", "2",
]  # fmt: skip


@pytest.mark.parametrize("ngpu", [1, 2])
def test_qlora_job_trains_saves_adapters_only_and_resumes_exactly(ngpu, tmp_path):
    dump = tmp_path / "out"
    args = [*OVERRIDES, "--dump_folder", str(dump)]
    losses = run_training(TOML, ngpu, [*args, "--training.steps", "4"], tmp_path / "a")
    assert len(losses) == 4 and losses[-1] < losses[0]
    stored = FileSystemReader(str(dump / "checkpoint" / "step-2")).read_metadata()
    keys = list(stored.state_dict_metadata)
    model_keys = [k for k in keys if k.startswith(("layers.", "tok_embeddings", "norm", "lm_head"))]
    assert model_keys and all(".lora_a." in k or ".lora_b." in k for k in model_keys)
    shutil.rmtree(dump / "checkpoint" / "step-4")
    resumed = run_training(TOML, ngpu, [*args, "--training.steps", "4"], tmp_path / "b")
    print(f"{ngpu} rank(s): {losses}; resumed at step 2: {resumed}")
    assert resumed == losses[2:]
