"""The pretraining loader's data state through ``run_train.sh`` (the debug job reads
the pre-tokenized debug corpus with it): a run resumed from a checkpoint trains on
the rows the uninterrupted run trained on, with other dataloader workers and at
another data-parallel size (same global batch)."""

import pytest
from train._harness import copy_checkpoint, max_rel_diff, run_training, write_fp32_debug_toml

pytestmark = pytest.mark.integration

SHORT = ["--training.seq_len", "64"]


@pytest.fixture(scope="module")
def toml(tmp_path_factory):
    return write_fp32_debug_toml(tmp_path_factory.mktemp("config") / "data.toml", lr=3e-4)


def test_resume_with_two_workers_continues_a_run_without_workers(toml, tmp_path):
    """Rows are a function of the global row number: the run resumed at step 2
    with 2 dataloader workers trains steps 3-4 exactly as the run without workers
    that never stopped (bitwise losses)."""
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "2", "--training.steps", "4", *SHORT]
    full_dump, resumed_dump = tmp_path / "full", tmp_path / "resumed"
    full = run_training(toml, 1, [*ckpt, "--dump_folder", str(full_dump)], tmp_path / "a")
    copy_checkpoint(full_dump, 2, resumed_dump)
    resumed = run_training(
        toml, 1,
        [*ckpt, "--dataloader.num_workers", "2", "--dump_folder", str(resumed_dump)],
        tmp_path / "b",
    )  # fmt: skip
    log = (tmp_path / "b" / "train.log").read_text()
    assert "Training starts at step 3" in log and "resuming at global row 8" in log
    assert resumed == full[2:]


def test_saved_at_dp4_resumed_at_dp2_trains_the_same_global_batches(toml, tmp_path):
    """4 ranks × 1 row saved at step 2, resumed on 2 ranks × 2 rows: the same
    global batches, so the same losses (to fp32 summation order: FSDP shards and
    reduces over 2 ranks instead of 4)."""
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "2", "--training.steps", "4", *SHORT]
    full_dump, resumed_dump = tmp_path / "dp4", tmp_path / "dp2"
    full = run_training(
        toml, 4, [*ckpt, "--training.local_batch_size", "1", "--dump_folder", str(full_dump)],
        tmp_path / "a", timeout=600,
    )  # fmt: skip
    copy_checkpoint(full_dump, 2, resumed_dump)
    resumed = run_training(
        toml, 2, [*ckpt, "--training.local_batch_size", "2", "--dump_folder", str(resumed_dump)],
        tmp_path / "b", timeout=600,
    )  # fmt: skip
    assert "resuming at global row 8" in (tmp_path / "b" / "train.log").read_text()
    # Step 3's loss comes from step 2's restored weights: only the order of the
    # loss reduction over ranks differs (measured 5e-6); step 4 adds one AdamW
    # update from gradients reduced over 2 ranks instead of 4 (measured 1.3e-5).
    # Other rows would move the loss by the step-to-step scale, ~3e-2.
    assert len(resumed) == 2
    assert max_rel_diff(resumed[:1], full[2:3]) < 2e-5, (full, resumed)
    assert max_rel_diff(resumed, full[2:]) < 1e-4, (full, resumed)
