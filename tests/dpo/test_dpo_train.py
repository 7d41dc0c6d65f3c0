"""DPO through ``run_train.sh`` (the job file users run), on the debug model with
LoRA and generated pairs: it starts at ln 2 with a zero margin, it learns the
preference on held-out pairs, and the loss is normalised per pair over the global
batch (1 rank × 4 pairs = 2 ranks × 2 = 2 accumulation steps × 2)."""

import json
import math
import re

import pytest

from train._harness import REPO_ROOT, copy_checkpoint, create_seed_checkpoint, run_training

from torchtitan_nemotron3.dpo.assets import generate_pairs

pytestmark = pytest.mark.integration

DPO_TOML = REPO_ROOT / "train_configs" / "debug_dpo.toml"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _log(tmp_path) -> str:
    return _ANSI.sub("", (tmp_path / "train.log").read_text())


def _metric(log: str, name: str) -> dict[int, float]:
    """``{step: value}`` of a ``losses: ... name: X`` line (logged before its step line)."""
    values, pending = {}, None
    for line in log.splitlines():
        if (m := re.search(rf"{name}:\s*([-+0-9.eE]+)", line)) and "losses:" in line:
            pending = float(m.group(1))
        elif (m := re.search(r"step:\s*(\d+)\s+loss:", line)) and pending is not None:
            values[int(m.group(1))] = pending
            pending = None
    return values


def test_debug_dpo_starts_at_ln2_and_learns_the_preference(tmp_path):
    losses = run_training(DPO_TOML, 1, ["--training.steps", "20"], tmp_path, timeout=900)
    log = _log(tmp_path)
    assert len(losses) == 20
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # adapters start at 0
    assert _metric(log, "dpo_margin")[1] == 0.0
    assert _metric(log, "dpo_accuracy")[1] == 0.0
    held_out = [
        tuple(map(float, m.groups()))
        for m in re.finditer(r"validation step (\d+): \d+ pairs, loss \S+, margin ([-0-9.]+), accuracy ([0-9.]+)", log)
    ]
    step, margin, accuracy = held_out[-1]
    assert step == 20 and margin > 0 and accuracy >= 0.8, held_out
    assert losses[-1] < 0.5 * math.log(2), losses


def _one_pair_per_row(tmp_path, seq_len: int) -> str:
    """Generated pairs longer than half a row: each row holds exactly one, so every
    layout below sees the same pairs in each step."""
    from torchtitan_nemotron3.dpo.data import PreferenceDataLoader, PreferenceDataset
    from torchtitan_nemotron3.sft.assets import ensure_debug_sft_assets

    class Tok:
        from tokenizers import Tokenizer

        tokenizer_path = ensure_debug_sft_assets()[0]
        tokenizer = Tokenizer.from_file(f"{tokenizer_path}/tokenizer.json")
        eos_id = tokenizer.token_to_id("<|im_end|>")

    folder = tmp_path / "pairs"
    folder.mkdir()
    cfg = PreferenceDataLoader.Config(dataset_path=str(folder))
    probe = folder / "train.jsonl"
    rows = generate_pairs(400, 99)
    probe.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = PreferenceDataset(cfg, tokenizer=Tok(), seq_len=seq_len)
    keep = []
    for i, row in enumerate(rows):
        p = ds.encode(i, f"row {i}", row)
        if p is not None and len(p) > seq_len // 2:
            keep.append(row)
    assert len(keep) >= 16, len(keep)
    probe.write_text("".join(json.dumps(r) + "\n" for r in keep[:16]))
    return str(folder)


def test_pairs_are_normalised_over_the_global_batch(tmp_path):
    """Loss and gradient norm of two steps are the same whether 4 pairs are one
    rank's batch, two ranks' (2 each), or two accumulation steps (2 each). All start
    from one process's initial weights (FSDP initialises its shards with other
    random draws), with balanced routing (a near top-k tie under another summation
    order would reroute a token)."""
    pairs = _one_pair_per_row(tmp_path, seq_len=256)
    seed = create_seed_checkpoint(DPO_TOML, tmp_path / "seed" / "dump")
    common = [
        "--checkpoint.enable",
        "--debug.moe_force_load_balance",
        "--training.steps", "2",
        "--dataloader.dataset_path", pairs,
        "--dataloader.shuffle_seed", "None",
        "--validator.no_enable",
        "--training.mixed_precision_param", "float32",
        "--debug.seed", "0",
    ]  # fmt: skip
    layouts = {
        "1x4": (1, ["--training.local_batch_size", "4"]),
        "2x2": (2, ["--training.local_batch_size", "2"]),
        "accum2x2": (1, ["--training.local_batch_size", "2", "--training.global_batch_size", "4"]),
    }
    results = {}
    for name, (ngpu, extra) in layouts.items():
        dump = tmp_path / name / "dump"
        copy_checkpoint(seed.parent.parent, 0, dump)
        args = common + extra + ["--dump_folder", str(dump)]
        losses = run_training(DPO_TOML, ngpu, args, tmp_path / name, timeout=600)
        log = _log(tmp_path / name)
        norms = [float(m) for m in re.findall(r"grad_norm:\s*([-+0-9.eE]+)", log)]
        results[name] = (losses, norms)
    ref_losses, ref_norms = results["1x4"]
    assert ref_losses[0] == pytest.approx(math.log(2), abs=1e-5)
    for name, (losses, norms) in results.items():
        assert losses == pytest.approx(ref_losses, rel=1e-4), (name, losses, ref_losses)
        assert norms == pytest.approx(ref_norms, rel=1e-4), (name, norms, ref_norms)
