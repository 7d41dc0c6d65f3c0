"""Context parallelism through the real trainer, on CPU gloo ranks, in fp32.

Rows are packed documents of the debug corpus (documents far shorter than a row),
so document boundaries fall inside shards, across shard boundaries and, by
chance, on them; TorchTitan shards every row head-tail (rank r holds segments r
and 2·cp-1-r). CP has a data-parallel world of its own ranks only, so CP=2 and
CP=4 read the batches one process reads; CP=2 × EP=2 × FSDP=2 on 4 ranks reads
FSDP=2's. Every run starts from one seed checkpoint and routes with TorchTitan's
balanced debug routing (``test_expert_parallel.py`` says why).

- CP=2 and CP=4 train 5 steps like one process: losses and final weights;
- CP=2 composed with EP=2 and FSDP=2 (4 ranks) trains like FSDP=2.

The mixers' exactness under CP (fp64, 2-4 ranks) is in
``test_mamba2_context_parallel.py`` and ``test_attention_context_parallel.py``.
"""

import pytest
from train._harness import (
    copy_checkpoint,
    create_seed_checkpoint,
    hf_weights,
    max_rel_diff,
    run_training,
    worst_weight_diff,
    write_fp32_debug_toml,
)

from torchtitan_nemotron3.model import flavor_args

pytestmark = pytest.mark.integration

STEPS = 5
REL = 1e-4  # losses: max relative difference; weights: ‖Δ‖/‖W‖ per tensor


@pytest.fixture(scope="module")
def toml(tmp_path_factory):
    return write_fp32_debug_toml(tmp_path_factory.mktemp("config") / "cp.toml")


@pytest.fixture(scope="module")
def seed_checkpoint(toml, tmp_path_factory):
    return create_seed_checkpoint(toml, tmp_path_factory.mktemp("seed") / "dump")


def _train(toml, seed_checkpoint, tmp_path, ngpu, overrides):
    """STEPS steps from the seed checkpoint; (losses, final weights, log)."""
    dump = tmp_path / "dump"
    copy_checkpoint(seed_checkpoint.parent.parent, 0, dump)
    args = ["--training.steps", str(STEPS), "--checkpoint.enable",
            "--checkpoint.interval", str(STEPS), "--dump_folder", str(dump),
            "--debug.moe_force_load_balance", *overrides]  # fmt: skip
    losses = run_training(toml, ngpu, args, tmp_path / "run")
    log = (tmp_path / "run" / "train.log").read_text()
    weights = hf_weights(dump / "checkpoint" / f"step-{STEPS}", flavor_args("debugmodel"))
    return losses, weights, log


def _assert_same_training(got, ref):
    (losses, weights, _), (ref_losses, ref_weights, _) = got, ref
    assert len(losses) == len(ref_losses) == STEPS
    loss_rel, (w_rel, worst) = max_rel_diff(losses, ref_losses), worst_weight_diff(
        weights, ref_weights
    )
    print(f"\nlosses {losses} vs {ref_losses}: max rel {loss_rel:.2e}; "
          f"weights max ‖Δ‖/‖W‖ {w_rel:.2e} ({worst})")  # fmt: skip
    assert loss_rel <= REL, (losses, ref_losses)
    assert w_rel <= REL, (worst, w_rel)


@pytest.fixture(scope="module")
def one_process(toml, seed_checkpoint, tmp_path_factory):
    return _train(toml, seed_checkpoint, tmp_path_factory.mktemp("ref"), 1, [])


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_trains_like_one_process(toml, seed_checkpoint, one_process, tmp_path, cp):
    got = _train(
        toml, seed_checkpoint, tmp_path, cp,
        ["--parallelism.context_parallel_degree", str(cp)],
    )  # fmt: skip
    assert f"Applied context parallelism to 9 NemotronH mixers (CP {cp}" in got[2]
    _assert_same_training(got, one_process)


def test_cp2_with_ep2_and_fsdp2_trains_like_fsdp2(toml, seed_checkpoint, tmp_path):
    fsdp = _train(toml, seed_checkpoint, tmp_path / "fsdp", 2, [])
    got = _train(
        toml, seed_checkpoint, tmp_path / "cp-ep", 4,
        ["--parallelism.context_parallel_degree", "2",
         "--parallelism.expert_parallel_degree", "2"],
    )  # fmt: skip
    assert "dp_shard=2, cp=2, tp=1, ep=2" in got[2]
    _assert_same_training(got, fsdp)
