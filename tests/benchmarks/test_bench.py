"""benchmarks/: our weights reach transformers' model through the package's name map,
the pre-timing check catches a difference, and the command line prints its table."""

import sys
from pathlib import Path

import torch
from nemotron_testing import build_model, random_args, randomize_

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench
import cases
import harness
import models


def check_note(ours, hf, tokens) -> str:
    case = cases.Case("test", "model", tokens.numel(), 0.0)
    case.impls["ours"] = (None, [], lambda: ours(tokens))
    case.impls["transformers"] = (None, [], lambda: hf(input_ids=tokens).logits)
    return harness.check_outputs(case, torch.float32)


def test_transformers_gets_our_weights_and_the_check_sees_a_change():
    args = random_args(0, num_layers=7)  # every layer type, 3-D experts
    ours = build_model(args)
    randomize_(ours, 0)
    hf = models.build_hf(args, ours, torch.float32, torch.device("cpu"), False)
    tokens = torch.randint(0, args.vocab_size, (2, 2 * args.chunk_size + 3))
    with torch.no_grad():
        assert harness.rel_err(hf(input_ids=tokens).logits, ours(tokens)) < 1e-5
        assert check_note(ours, hf, tokens).startswith("rel diff ")
        assert "MISMATCH" not in check_note(ours, hf, tokens)
        mamba = args.hybrid_override_pattern.index("M")
        ours.layers[str(mamba)].mixer.D.add_(1.0)
        assert check_note(ours, hf, tokens).endswith("MISMATCH")


def test_command_line_prints_the_table(monkeypatch, capsys):
    monkeypatch.setattr(
        sys,
        "argv",
        ["bench.py", "--configs", "debug", "--only", "*", "--seq_len", "16",
         "--reps", "1", "--min_seconds", "0"],
    )  # fmt: skip
    bench.main()
    rows = [
        line for line in capsys.readouterr().out.splitlines() if "| debug |" in line
    ]
    assert [r.split(" | ")[1:3] for r in rows] == [
        ["block *", "ours"],
        ["block *", "transformers"],
    ]
    assert "rel diff" in rows[1] and "MISMATCH" not in rows[1]
