"""Training with multi-token prediction: the trainer's loss (``train/mtp_loss.py``)
equals ``model.mtp.mtp_loss`` (itself checked against a plain reference in
tests/model/test_mtp.py), with TorchTitan's plain and chunked cross-entropy, and
the debug model with latent MoE and MTP trains through the real launcher and
resumes bit for bit.
"""

import math

import pytest
import torch
from _harness import copy_checkpoint, hf_weights, run_training, write_fp32_debug_toml
from nemotron_testing import build_model
from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss

from torchtitan_nemotron3.model import flavor_args
from torchtitan_nemotron3.model.model import seq_idx_from_positions
from torchtitan_nemotron3.model.mtp import mtp_loss
from torchtitan_nemotron3.train.mtp_loss import MTPLoss

DOCS = [20, 3, 1, 40]  # 64 tokens per row, divisible by the 8 loss chunks


def _inputs(args, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab_size, (2, sum(DOCS)), generator=g)
    labels = torch.randint(0, args.vocab_size, tokens.shape, generator=g)
    positions = torch.cat([torch.arange(n) for n in DOCS]).repeat(2, 1)
    return tokens, labels, positions


@pytest.mark.parametrize("chunked", [False, True])
def test_trainer_loss_equals_the_definition(chunked):
    args = flavor_args("debugmodel-mtp").replace(vocab_size=512)
    tokens, labels, positions = _inputs(args)

    reference = build_model(args, seed=2)
    want, terms = mtp_loss(
        reference(tokens, positions=positions),
        labels,
        seq_idx_from_positions(positions),
        args.mtp_loss_scaling_factor,
    )
    want.backward()

    model = build_model(args, seed=2)
    if chunked:
        inner = ChunkedLossWrapper(ChunkedLossWrapper.Config(num_chunks=8))
        inner.set_lm_head(model.lm_head)
        model._skip_lm_head = True
    else:
        inner = CrossEntropyLoss(CrossEntropyLoss.Config())
    loss_fn = MTPLoss(inner, args.mtp_num_layers, args.mtp_loss_scaling_factor)
    n_tokens = torch.tensor(labels.numel())
    got, _ = loss_fn(
        model(tokens, positions=positions), labels, n_tokens, positions=positions
    )
    got.backward()

    assert torch.allclose(got, want, rtol=1e-5)
    logged = loss_fn.pop_terms()
    assert sorted(logged) == ["main", "mtp_1", "mtp_2"]
    for name, value in logged.items():
        assert torch.allclose(value, terms[name], rtol=1e-5), name
    reference_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        want_grad = reference_params[name].grad
        err = (p.grad - want_grad).abs().max() / want_grad.abs().max()
        assert err <= 1e-5, (name, err.item())


def test_step_counts_are_each_depths_own():
    """Depth k's CE is a mean over its own valid tokens of the whole step: with
    the step's counts, two half batches give the full batch's loss and terms."""
    args = flavor_args("debugmodel-mtp").replace(vocab_size=512)
    tokens, labels, positions = _inputs(args, seed=1)
    model = build_model(args, seed=3)
    whole = MTPLoss(CrossEntropyLoss(CrossEntropyLoss.Config()), 2, 0.3)
    want, _ = whole(
        model(tokens, positions=positions),
        labels,
        torch.tensor(labels.numel()),
        positions=positions,
    )
    want_terms = whole.pop_terms()

    halves = MTPLoss(CrossEntropyLoss(CrossEntropyLoss.Config()), 2, 0.3)
    halves.start_step(lambda t: t)
    for row in range(2):
        halves.count_batch(labels[row : row + 1], positions[row : row + 1])
    got = sum(
        halves(
            model(tokens[row : row + 1], positions=positions[row : row + 1]),
            labels[row : row + 1],
            torch.tensor(labels.numel()),
            positions=positions[row : row + 1],
        )[0]
        for row in range(2)
    )
    assert torch.allclose(got, want, rtol=1e-5)
    for name, value in halves.pop_terms().items():
        assert torch.allclose(value, want_terms[name], rtol=1e-5), name


def test_job_file_turns_mtp_off_or_sets_its_depth_and_weight():
    from torchtitan_nemotron3 import model_registry
    from torchtitan_nemotron3.train.trainer import NemotronHTrainer

    def config(flavor, **kw):
        return NemotronHTrainer.Config(model_spec=model_registry(flavor), **kw)

    assert config("debugmodel-mtp").model_spec.model.mtp.num_depths == 2
    assert config("debugmodel-mtp", mtp_num_layers=0).model_spec.model.mtp is None
    mtp = config(
        "debugmodel-mtp", mtp_num_layers=3, mtp_loss_scaling_factor=0.1
    ).model_spec.model.mtp
    assert (mtp.num_depths, mtp.loss_scaling_factor) == (3, 0.1)
    with pytest.raises(
        ValueError, match=r"mtp_num_layers=2: flavor 'debugmodel' has no MTP"
    ):
        config("debugmodel", mtp_num_layers=2)
    with pytest.raises(ValueError, match=r"mtp_loss_scaling_factor=-1.0: must be >= 0"):
        config("debugmodel-mtp", mtp_loss_scaling_factor=-1.0)


@pytest.fixture(scope="module")
def mtp_toml(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "nemotron3_debug_mtp.toml"
    return write_fp32_debug_toml(path, "nemotron3_debug_mtp", "tests.train.mtp_config")


@pytest.mark.integration
def test_debug_mtp_learns_logs_each_depth_and_resumes_bitwise(mtp_toml, tmp_path):
    ckpt = [
        "--checkpoint.enable",
        "--checkpoint.interval",
        "2",
        "--training.steps",
        "4",
    ]
    full_dump, resumed_dump = tmp_path / "full", tmp_path / "resumed"
    full = run_training(
        mtp_toml, 1, [*ckpt, "--dump_folder", str(full_dump)], tmp_path / "a"
    )
    copy_checkpoint(full_dump, 2, resumed_dump)
    resumed = run_training(
        mtp_toml, 1, [*ckpt, "--dump_folder", str(resumed_dump)], tmp_path / "b"
    )
    assert resumed == full[2:]
    # it learns (the main loss starts near uniform) and logs each depth
    assert abs(full[0] - math.log(2048)) < 1.0 and full[-1] < full[0] - 1.0, full
    log = (tmp_path / "a" / "train.log").read_text()
    assert log.count("losses: mtp_1:") == 4 and log.count("mtp_2:") == 4
    args = flavor_args("debugmodel-mtp")
    full_w = hf_weights(full_dump / "checkpoint" / "step-4", args)
    resumed_w = hf_weights(resumed_dump / "checkpoint" / "step-4", args)
    assert full_w.keys() == resumed_w.keys()
    assert any(n.startswith("mtp.layers.1.mixer.experts.") for n in full_w)
    for name, t in full_w.items():
        assert torch.equal(t, resumed_w[name]), name
    # the routing-bias update reaches the MTP block's MoE too
    assert full_w["mtp.layers.1.mixer.gate.e_score_correction_bias"].abs().max() > 0
