"""Expert parallelism through the real trainer, on 2 CPU ranks over gloo, in fp32.

EP=2 borrows its ranks from the data-parallel dimension, so it reads the same
data as FSDP=2 on the same ranks: the reference is that FSDP=2 run. Batches are
packed documents (the debug corpus's documents are far shorter than a row).

EP sums the same products in another order (an expert's grouped GEMM sees both
ranks' tokens), so fp32 results differ in the last bits, and over a few AdamW
steps a token whose top-k scores nearly tie can pick another expert: a discrete
change that moves those experts' weights by ~1e-3 while the loss moves by ~1e-5.
Losses are compared with real routing; weights with TorchTitan's
``debug.moe_force_load_balance`` routing, which has no such ties.

- EP=2 trains like FSDP=2: losses; weights (balanced routing);
- EP resumes from its own checkpoint exactly, and its HF export (written from the
  expert-sharded layout) is bitwise the one-process export of the same weights,
  and loads into transformers;
- a DCP checkpoint saved under FSDP=2 resumes under EP=2 and training continues
  as the uninterrupted FSDP=2 run does (losses and weights, balanced routing).
"""

import shutil

import pytest
import torch
import transformers

from hf.hf_checkpoints import read_tensors
from torchtitan_nemotron3.hf.dcp_convert import dcp_to_hf
from torchtitan_nemotron3.model import flavor_args
from train._harness import run_training

pytestmark = pytest.mark.integration

STEPS = 6
TOML = """\
[job]
config = "nemotron3_debugmodel"

[training]
local_batch_size = 4
seq_len = 128
mixed_precision_param = "float32"

[metrics]
log_freq = 1

[debug]
seed = 0
"""
CKPT = ["--checkpoint.enable", "--checkpoint.interval", "2"]
EP2 = ["--parallelism.expert_parallel_degree", "2"]
BALANCED = ["--debug.moe_force_load_balance"]
REL = 1e-4  # losses, max relative difference; weights, ‖Δ‖/‖W‖ per tensor


@pytest.fixture(scope="module")
def toml(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "debug.toml"
    path.write_text(TOML)
    return path


def _train(toml, tmp, name, overrides):
    dump = tmp / name
    losses = run_training(
        toml, 2, [*CKPT, "--dump_folder", str(dump), *overrides], tmp / f"{name}-log"
    )
    return losses, dump


def _resume_from(src_dump, step, dst_dump):
    (dst_dump / "checkpoint").mkdir(parents=True)
    shutil.copytree(
        src_dump / "checkpoint" / f"step-{step}", dst_dump / "checkpoint" / f"step-{step}"
    )


@pytest.fixture(scope="module")
def runs(toml, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    steps = ["--training.steps", str(STEPS)]
    fsdp = _train(toml, tmp, "fsdp", steps)
    ep = _train(toml, tmp, "ep", [*EP2, *steps])
    return tmp, fsdp, ep


def _hf_weights(dump, step):
    out = dump.parent / f"hf-{dump.name}-{step}"
    if not out.exists():
        dcp_to_hf(dump / "checkpoint" / f"step-{step}", out, flavor_args("debugmodel"))
    return read_tensors(out)


def _assert_close(got, ref, rel, what):
    assert len(got) == len(ref), (what, got, ref)
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
    assert worst <= rel, (what, worst, got, ref)


def _assert_weights_close(got, ref, rel):
    assert got.keys() == ref.keys()
    worst = max(
        (float((got[n] - t).norm() / t.norm().clamp_min(1e-12)), n) for n, t in ref.items()
    )
    assert worst[0] <= rel, worst


def test_ep_trains_like_fsdp(runs):
    tmp, (fsdp_losses, _), (ep_losses, _) = runs
    assert len(fsdp_losses) == STEPS and fsdp_losses[-1] < fsdp_losses[0] - 1.0
    _assert_close(ep_losses, fsdp_losses, REL, "losses")
    log = (tmp / "ep-log" / "train.log").read_text()
    assert "dp_shard=2, cp=1, tp=1, ep=2" in log and "EP 2" in log


def test_ep_resume_is_exact_and_exports_the_one_process_bytes(toml, runs):
    tmp, _, (ep_losses, ep_dump) = runs
    resumed = tmp / "ep-resumed"
    _resume_from(ep_dump, 4, resumed)
    losses, _ = _train(
        toml,
        tmp,
        "ep-resumed",
        [
            *EP2,
            "--training.steps",
            str(STEPS),
            "--checkpoint.last_save_in_hf",
            "--checkpoint.last_save_model_only",
            "--checkpoint.export_dtype",
            "float32",
        ],
    )
    assert losses == ep_losses[4:]
    export = resumed / "checkpoint" / f"step-{STEPS}"
    exported, one_process = read_tensors(export), _hf_weights(ep_dump, STEPS)
    assert exported.keys() == one_process.keys()
    for name, t in one_process.items():
        assert exported[name].dtype == t.dtype and torch.equal(exported[name], t), name
    _, info = transformers.AutoModelForCausalLM.from_pretrained(
        export, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_fsdp_checkpoint_resumes_under_ep_like_the_uninterrupted_run(toml, tmp_path):
    steps = ["--training.steps", str(STEPS)]
    fsdp_losses, fsdp_dump = _train(toml, tmp_path, "fsdp", [*BALANCED, *steps])
    _resume_from(fsdp_dump, 2, tmp_path / "fsdp-to-ep")
    losses, dump = _train(toml, tmp_path, "fsdp-to-ep", [*EP2, *BALANCED, *steps])
    log = (tmp_path / "fsdp-to-ep-log" / "train.log").read_text()
    assert "Training starts at step 3" in log and "EP 2" in log
    _assert_close(losses, fsdp_losses[2:], REL, "losses after the layout change")
    _assert_weights_close(_hf_weights(dump, STEPS), _hf_weights(fsdp_dump, STEPS), REL)
