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
- checkpoints move between layouts: one saved under FSDP=2 resumes under EP=2,
  and EP=2's resumes on 4 ranks under TP=2 × EP=2 × FSDP=2 and under
  PP=2 × EP=2 × FSDP=2 (the data-parallel degree stays 2, so the batches are the
  same); every leg continues as the uninterrupted FSDP=2 run does (losses and
  weights, balanced routing). The last legs are also the composition tests:
  EP with TP (and SP), and EP with PP, against plain FSDP.
"""

import pytest
import torch
import transformers
from hf.hf_checkpoints import read_tensors
from train._harness import (
    copy_checkpoint,
    hf_weights,
    max_rel_diff,
    run_training,
    worst_weight_diff,
    write_fp32_debug_toml,
)

from torchtitan_nemotron3.model import flavor_args

pytestmark = pytest.mark.integration

STEPS = 6
CKPT = ["--checkpoint.enable", "--checkpoint.interval", "2"]
EP2 = ["--parallelism.expert_parallel_degree", "2"]
BALANCED = ["--debug.moe_force_load_balance"]
REL = 1e-4  # losses, max relative difference; weights, ‖Δ‖/‖W‖ per tensor


@pytest.fixture(scope="module")
def toml(tmp_path_factory):
    return write_fp32_debug_toml(tmp_path_factory.mktemp("config") / "debug.toml")


def _train(toml, tmp, name, overrides, ngpu=2, log_rank="0"):
    dump = tmp / name
    losses = run_training(
        toml,
        ngpu,
        [*CKPT, "--dump_folder", str(dump), *overrides],
        tmp / f"{name}-log",
        env={"LOG_RANK": log_rank},
    )
    return losses, dump


@pytest.fixture(scope="module")
def runs(toml, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    steps = ["--training.steps", str(STEPS)]
    fsdp = _train(toml, tmp, "fsdp", steps)
    ep = _train(toml, tmp, "ep", [*EP2, *steps])
    return tmp, fsdp, ep


def _weights(dump, step):
    return hf_weights(dump / "checkpoint" / f"step-{step}", flavor_args("debugmodel"))


def _assert_same_training(losses, ref_losses, weights, ref_weights):
    loss_rel, worst = (
        max_rel_diff(losses, ref_losses),
        worst_weight_diff(weights, ref_weights),
    )
    print(
        f"\nlosses max rel {loss_rel:.2e}; weights max ‖Δ‖/‖W‖ {worst[0]:.2e} ({worst[1]})"
    )
    assert loss_rel <= REL, (losses, ref_losses)
    assert worst[0] <= REL, worst


def test_ep_trains_like_fsdp(runs):
    tmp, (fsdp_losses, _), (ep_losses, _) = runs
    assert len(fsdp_losses) == STEPS and fsdp_losses[-1] < fsdp_losses[0] - 1.0
    assert max_rel_diff(ep_losses, fsdp_losses) <= REL, (ep_losses, fsdp_losses)
    log = (tmp / "ep-log" / "train.log").read_text()
    assert "dp_shard=2, cp=1, tp=1, ep=2" in log and "EP 2" in log


def test_ep_resume_is_exact_and_exports_the_one_process_bytes(toml, runs):
    tmp, _, (ep_losses, ep_dump) = runs
    resumed = tmp / "ep-resumed"
    copy_checkpoint(ep_dump, 4, resumed)
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
    exported, one_process = read_tensors(export), _weights(ep_dump, STEPS)
    assert exported.keys() == one_process.keys()
    for name, t in one_process.items():
        assert exported[name].dtype == t.dtype and torch.equal(exported[name], t), name
    _, info = transformers.AutoModelForCausalLM.from_pretrained(
        export, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info


@pytest.fixture(scope="module")
def chain(toml, tmp_path_factory):
    """Uninterrupted FSDP=2 (balanced routing), and EP=2 resumed from its step 2."""
    tmp = tmp_path_factory.mktemp("chain")
    steps = ["--training.steps", str(STEPS)]
    fsdp = _train(toml, tmp, "fsdp", [*BALANCED, *steps])
    copy_checkpoint(fsdp[1], 2, tmp / "fsdp-to-ep")
    ep = _train(toml, tmp, "fsdp-to-ep", [*EP2, *BALANCED, *steps])
    return tmp, fsdp, ep


def test_fsdp_checkpoint_resumes_under_ep_like_the_uninterrupted_run(chain):
    tmp, (fsdp_losses, fsdp_dump), (losses, dump) = chain
    log = (tmp / "fsdp-to-ep-log" / "train.log").read_text()
    assert "Training starts at step 3" in log and "EP 2" in log
    _assert_same_training(
        losses, fsdp_losses[2:], _weights(dump, STEPS), _weights(fsdp_dump, STEPS)
    )


@pytest.mark.parametrize(
    "name,layout,mesh,log_rank",
    [
        ("tp2-ep2-fsdp2",
         ["--parallelism.tensor_parallel_degree", "2",
          "--parallelism.enable_sequence_parallel"],
         "pp=1, dp_replicate=1, dp_shard=2, cp=1, tp=2, ep=2", "0"),
        ("pp2-ep2-fsdp2",
         ["--parallelism.pipeline_parallel_degree", "2"],
         "pp=2, dp_replicate=1, dp_shard=2, cp=1, tp=1, ep=2", "2"),
    ],
    ids=["tp2-ep2-fsdp2", "pp2-ep2-fsdp2"],
)  # fmt: skip
def test_ep_checkpoint_resumes_on_4_ranks_composed_with_tp_or_pp(
    toml, chain, name, layout, mesh, log_rank
):
    """The chain's last leg: EP=2's step-4 checkpoint on 4 ranks, EP composed with
    TP+SP or with PP (FSDP=2 in both), trains steps 5-6 as FSDP=2 did. Under PP
    the loss is logged by a last-stage rank (ranks 2-3: ``pp`` is the outermost
    mesh dimension)."""
    tmp, (fsdp_losses, fsdp_dump), (_, ep_dump) = chain
    copy_checkpoint(ep_dump, 4, tmp / name)
    losses, dump = _train(
        toml,
        tmp,
        name,
        [*EP2, *layout, *BALANCED, "--training.steps", str(STEPS)],
        4,
        log_rank,
    )
    log = (tmp / f"{name}-log" / "train.log").read_text()
    assert "Training starts at step 5" in log and mesh in log, log[-3000:]
    _assert_same_training(
        losses, fsdp_losses[4:], _weights(dump, STEPS), _weights(fsdp_dump, STEPS)
    )
