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
    assert len(resumed) == 2
    assert max_rel_diff(resumed[:1], full[2:3]) < 2e-5, (full, resumed)
    assert max_rel_diff(resumed, full[2:]) < 1e-4, (full, resumed)
    # Control: the same resume without the data state (rows from 0 again) is
    # far off, so the tolerance above does tell the rows apart.
    control_dump = tmp_path / "control"
    copy_checkpoint(full_dump, 2, control_dump)
    control = run_training(
        toml, 2,
        [*ckpt, "--training.steps", "3", "--training.local_batch_size", "2",
         "--checkpoint.exclude_from_loading", "dataloader", "--dump_folder", str(control_dump)],
        tmp_path / "c", timeout=600,
    )  # fmt: skip
    assert max_rel_diff(control, full[2:3]) > 1e-3, (full, control)


def test_named_validation_sets_on_held_out_documents(toml, tmp_path):
    """Two named sets over the documents training holds out: each set's loss is
    logged under its name, the two equal (same rows), every evaluation."""
    import re

    prefix = _debug_prefix()
    run_training(
        toml, 1,
        ["--training.steps", "2", *SHORT, "--dataloader.valid_fraction", "0.05",
         "--validator.enable", "--validator.freq", "2", "--validator.steps", "2",
         "--validator.sets", f"heldout={prefix},again=1 {prefix}"],
        tmp_path,
    )  # fmt: skip
    log = (tmp_path / "train.log").read_text()
    found = re.findall(r"validate step:\s+(\d+)\s+(\w+) loss:\s+([0-9.]+)", log)
    by_step = {}
    for step, name, loss in found:
        by_step.setdefault(int(step), {})[name] = float(loss)
    assert sorted(by_step) == [1, 2], found
    for losses in by_step.values():
        assert set(losses) == {"heldout", "again"} and losses["heldout"] == losses["again"]
    assert by_step[1]["heldout"] != by_step[2]["heldout"]  # the model trained in between
    assert re.search(r"data: train 1\.0000 \(epoch 0\.\d+\)", log)


def _debug_prefix() -> str:
    from torchtitan_nemotron3.train.assets import ensure_debug_pretokenized

    return ensure_debug_pretokenized()[1]
