"""Tensor parallelism (with and without sequence parallelism) for NemotronH.

The multi-rank tests run ``tp_worker.py`` on 2 CPU ranks over gloo, in fp32, on
the debug flavor (8 heads, 2 KV heads, 8 Mamba heads, 2 groups, MoE layers
sharded by ``sharding.set_moe_sharding``): 5 AdamW steps on a batch of packed
documents, against the unsharded model from the same weights on the same batch.
TP sums the same products in another order, so results agree to rounding, not
bitwise; the HF export holds the same weights, so it agrees bitwise. One more
case runs through the real trainer (TP=2 with SP against one process).
"""

import dataclasses

import pytest
import torch.multiprocessing as mp
from train._harness import (
    copy_checkpoint,
    create_seed_checkpoint,
    hf_weights,
    max_rel_diff,
    run_training,
    worst_weight_diff,
    write_fp32_debug_toml,
)

from torchtitan_nemotron3.hf.dcp_convert import dcp_to_hf
from torchtitan_nemotron3.model import build_model_config, flavor_args
from torchtitan_nemotron3.tensor_parallel import (
    check_tensor_parallel,
    set_dense_sharding_config,
)

WORLD = 2
STEPS = 5
SEQ_LEN = 128
REL = 1e-4  # losses: |Δ|/|loss|; weights: ‖Δ‖/‖W‖ per tensor, gathered
LR = 3e-4  # the trainer run's; see tp_worker.LR


@pytest.mark.integration
@pytest.mark.parametrize("enable_sp", [False, True], ids=["tp2", "tp2-sp"])
def test_tp2_trains_like_one_rank(tmp_path, enable_sp):
    from tp_worker import worker

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(
            worker,
            args=(WORLD, str(tmp_path / "rdv"), enable_sp, STEPS, SEQ_LEN, results),
            nprocs=WORLD,
            join=True,
        )
        res = dict(results)

    ref, tp = res["ref_losses"], res["tp_losses"]
    assert len(tp) == STEPS and ref[-1] < ref[0]
    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(tp, ref))
    assert loss_rel <= REL, (loss_rel, tp, ref)
    worst = max(res["weight_rel"].items(), key=lambda kv: kv[1])
    print(f"\nTP=2 (sp={enable_sp}): losses max rel {loss_rel:.2e}; weights {worst}")
    assert worst[1] <= REL, worst

    # Sharded as declared: Mamba parts by head, out projections rowwise.
    p = res["placements"]
    for name in (
        "layers.0.mixer.in_proj.z.weight",
        "layers.0.mixer.in_proj.B.weight",
        "layers.0.mixer.in_proj.dt.weight",
        "layers.0.mixer.conv1d.C.weight",
        "layers.0.mixer.A_log",
        "layers.0.mixer.norm.weight",
        "layers.3.mixer.k_proj.weight",
        "layers.6.mixer.up_proj.weight",
        "lm_head.weight",
    ):
        assert p[name] == "(Shard(dim=0),)", name
    for name in ("layers.0.mixer.out_proj.weight", "layers.3.mixer.o_proj.weight"):
        assert p[name] == "(Shard(dim=1),)", name

    # HF export of the sharded model = the unsharded export, bit for bit; and it
    # loads back into the sharded layout exactly.
    assert res["export_mismatch"] == []
    assert res["reload_mismatch"] == []
    # Through TorchTitan's checkpointer: last_save_in_hf writes those bytes,
    # initial_load_in_hf loads them into a fresh sharded model exactly.
    assert res["file_mismatch"] == []
    assert res["load_mismatch"] == []


def test_check_tensor_parallel_names_the_numbers():
    args = flavor_args("debugmodel")  # 8 heads, 2 KV heads, 8 Mamba heads, 2 groups
    check_tensor_parallel(args, 1)
    check_tensor_parallel(args, 2)
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        check_tensor_parallel(args, 4)
    with pytest.raises(ValueError, match="num_attention_heads=8"):
        check_tensor_parallel(args, 3)
    no_attention = dataclasses.replace(
        args, hybrid_override_pattern="MEM-", num_hidden_layers=None
    )
    check_tensor_parallel(no_attention, 2)
    with pytest.raises(ValueError, match="n_groups=2"):
        check_tensor_parallel(no_attention, 4)
    with pytest.raises(ValueError, match="mamba_num_heads=8"):
        check_tensor_parallel(
            dataclasses.replace(no_attention, n_groups=1), 16
        )


def _tp(layout) -> str:
    """A layout's placement on the TP mesh axis: "S(0)", "R", "P", "I", "V"."""
    from torchtitan.distributed.parallel_dims import MeshAxisName

    return str(layout.axis_types[MeshAxisName.TP]).rsplit(".", 1)[-1]


def _params_tp(module_cfg) -> dict[str, str]:
    return {k: _tp(v) for k, v in module_cfg.sharding_config.state_shardings.items()}


# The intended TP layout (Megatron-LM's): colwise = weight Shard(0) (output
# features), rowwise = weight Shard(1) (input features, output a partial sum);
# Mamba's per-head tensors and gated-norm weight Shard(0) by head.
COLWISE = {"weight": "S(0)", "bias": "S(0)"}
ROWWISE = {"weight": "S(1)", "bias": "R"}


@pytest.mark.parametrize("enable_sp", [False, True])
def test_dense_sharding_places_each_parameter_as_intended(enable_sp):
    """Every dense parameter's TP placement, each mixer's input gathered to
    replicated and each output projection's partial sum reduced (scattered to
    sequence shards with SP); MoE mixers are left to sharding.py."""
    cfg = build_model_config(flavor_args("debugmodel"), kernel_backend="torch")
    set_dense_sharding_config(cfg, enable_sp=enable_sp)
    assert _params_tp(cfg.tok_embeddings) == {"weight": "S(0)"}
    assert _params_tp(cfg.lm_head) == {"weight": "S(0)"}
    assert _tp(cfg.lm_head.sharding_config.out_dst_shardings) == "S(-1)"
    assert _params_tp(cfg.norm)["weight"] in ("R", "I")  # replicated
    reduced = "V" if enable_sp else "I"  # sequence shards, or all-reduced
    kinds = set()
    for layer in cfg.layers:
        kind, mixer = layer.layer_type, layer.mixer
        kinds.add(kind)
        assert _params_tp(layer.norm)["weight"] in ("R", "I")
        if kind == "E":
            assert mixer.sharding_config is None
            assert mixer.shared_experts.up_proj.sharding_config is None
            assert mixer.router.sharding_config is None
            continue
        gathered = {k: _tp(v) for k, v in mixer.sharding_config.in_dst_shardings.items()}
        assert gathered == {"x_BLD": "R"}, (kind, gathered)
        if kind == "M":
            assert _params_tp(mixer) == dict.fromkeys(("A_log", "D", "dt_bias"), "S(0)")
            for part in ("z", "x", "B", "C", "dt"):
                assert _params_tp(getattr(mixer.in_proj, part)) == COLWISE, part
            for part in ("x", "B", "C"):
                assert _params_tp(getattr(mixer.conv1d, part)) == COLWISE, part
            assert _params_tp(mixer.norm) == {"weight": "S(0)"}
            out = mixer.out_proj
        elif kind == "*":
            for proj in (mixer.q_proj, mixer.k_proj, mixer.v_proj):
                assert _params_tp(proj) == COLWISE
            heads = mixer.inner_attention.sharding_config.in_dst_shardings
            assert {k: _tp(v) for k, v in heads.items()} == dict.fromkeys(
                ("q_BLHP", "k_BLHP", "v_BLHP"), "S(2)"
            )
            out = mixer.o_proj
        else:
            assert kind == "-", kind
            assert _params_tp(mixer.up_proj) == COLWISE
            out = mixer.down_proj
        assert _params_tp(out) == ROWWISE, kind
        assert _tp(out.sharding_config.out_src_shardings) == "P", kind
        assert _tp(out.sharding_config.out_dst_shardings) == reduced, kind
    assert kinds == {"M", "*", "-", "E"}


def test_dcp_checkpoint_from_before_the_split_is_refused_and_converts(tmp_path):
    """A DCP checkpoint holding the packed ``mixer.in_proj.weight`` /
    ``mixer.conv1d.weight``: DCP alone fails on a missing part, so
    ``check_dcp_layout`` refuses it naming the conversion, and that conversion
    (dcp-to-hf, then the hub format as usual) gives back the same weights."""
    import torch
    import torch.distributed.checkpoint as dcp

    from torchtitan_nemotron3 import from_pretrained
    from torchtitan_nemotron3.hf import NemotronHStateDictAdapter
    from torchtitan_nemotron3.hf.dcp_convert import check_dcp_layout
    from torchtitan_nemotron3.hf.naming import HUB_PREFIX, packed_part, packed_parts

    args = flavor_args("debugmodel")
    cfg = build_model_config(args, kernel_backend="torch")
    torch.manual_seed(0)
    model = cfg.build()
    model.init_states()
    state = model.state_dict()
    legacy = {n: t for n, t in state.items() if packed_part(n) is None}
    for hub, t in NemotronHStateDictAdapter(cfg, None).to_hf(state).items():
        if packed_parts(hub) is not None:
            legacy[hub.removeprefix(HUB_PREFIX)] = t
    assert "layers.0.mixer.in_proj.weight" in legacy
    dcp.save(legacy, checkpoint_id=str(tmp_path / "old"), no_dist=True)
    dcp.save(state, checkpoint_id=str(tmp_path / "new"), no_dist=True)

    check_dcp_layout(tmp_path / "new")
    # (DCP's CheckpointException is a BaseException)
    with pytest.raises(BaseException, match=r"Missing key .*mixer\.(in_proj|conv1d)\."):
        dcp.load(model.state_dict(), checkpoint_id=str(tmp_path / "old"), no_dist=True)
    with pytest.raises(ValueError, match="layers.0.mixer.conv1d.bias.*dcp-to-hf"):
        check_dcp_layout(tmp_path / "old")
    # The trainer asks before loading: as initial_load_path, and as the latest
    # step of the run's own checkpoint folder (a resumed run).
    from torchtitan_nemotron3.train.__main__ import check_config
    from torchtitan_nemotron3.train.toml_config import ConfigError, load_job

    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    (tmp_path / "old").rename(tmp_path / "run" / "checkpoint" / "step-7")
    for flags, where in (
        (["--checkpoint.initial_load_path", str(tmp_path / "run/checkpoint/step-7")],
         "command line: "),
        (["--dump_folder", str(tmp_path / "run")], r"torchtitan_nemotron3:nemotron3_debugmodel\(\): "),
    ):  # fmt: skip
        config, source_of = load_job(
            "train_configs/debug_model.toml", ["--checkpoint.enable", *flags]
        )
        with pytest.raises(ConfigError, match=f"^{where}.*step-7 stores the packed"):
            check_config(config, source_of)
    (tmp_path / "run" / "checkpoint" / "step-7").rename(tmp_path / "old")

    dcp_to_hf(tmp_path / "old", tmp_path / "hf", args)
    loaded = from_pretrained(tmp_path / "hf", kernel_backend="torch").state_dict()
    assert loaded.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name


def test_check_tensor_parallel_reads_a_model_config_too():
    args = flavor_args("debugmodel")
    cfg = build_model_config(args, kernel_backend="torch")
    check_tensor_parallel(cfg, 2)
    with pytest.raises(ValueError, match="tensor_parallel_degree=4 must divide num_key_value_heads=2"):
        check_tensor_parallel(cfg, 4)


# ---- through the trainer


@pytest.fixture(scope="module")
def tp_toml(tmp_path_factory):
    return write_fp32_debug_toml(tmp_path_factory.mktemp("config") / "tp.toml", lr=LR)


@pytest.fixture(scope="module")
def seed_checkpoint(tp_toml, tmp_path_factory):
    """A TP run initialises its shards with other random draws: both runs start
    from one process's initial weights."""
    return create_seed_checkpoint(tp_toml, tmp_path_factory.mktemp("seed") / "dump")


def _train(toml, seed_checkpoint, tmp_path, ngpu, overrides):
    """STEPS steps from the seed checkpoint, balanced routing (see
    test_expert_parallel.py: a near top-k tie under another summation order
    reroutes a token); (losses, final hub-format weights)."""
    dump = tmp_path / "dump"
    copy_checkpoint(seed_checkpoint.parent.parent, 0, dump)
    args = ["--training.steps", str(STEPS), "--checkpoint.enable",
            "--checkpoint.interval", str(STEPS), "--dump_folder", str(dump),
            "--debug.moe_force_load_balance", *overrides]  # fmt: skip
    losses = run_training(toml, ngpu, args, tmp_path / "run")
    weights = hf_weights(dump / "checkpoint" / f"step-{STEPS}", flavor_args("debugmodel"))
    return losses, weights


@pytest.mark.integration
def test_trainer_tp2_sp_trains_like_one_process(tp_toml, seed_checkpoint, tmp_path):
    """The real trainer (``run_train.sh``), TP=2 with SP on 2 ranks (data parallel
    1, so the same batches) vs one process, from the same seed checkpoint: losses,
    and the final weights (the TP-sharded DCP checkpoint, converted to the hub
    format). Every layer type; routed experts are TP-sharded (no EP)."""
    ref_losses, ref_weights = _train(tp_toml, seed_checkpoint, tmp_path / "ref", 1, [])
    losses, weights = _train(
        tp_toml, seed_checkpoint, tmp_path / "tp", 2,
        ["--parallelism.tensor_parallel_degree", "2",
         "--parallelism.enable_sequence_parallel"],
    )  # fmt: skip
    assert len(losses) == len(ref_losses) == STEPS
    loss_rel, (w_rel, worst) = max_rel_diff(losses, ref_losses), worst_weight_diff(
        weights, ref_weights
    )
    print(f"\nlosses {losses} vs {ref_losses}: max rel {loss_rel:.2e}; "
          f"weights max ‖Δ‖/‖W‖ {w_rel:.2e} ({worst})")
    assert loss_rel <= REL, (losses, ref_losses)
    assert w_rel <= REL, (worst, w_rel)
