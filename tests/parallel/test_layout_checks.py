"""Every layout NemotronH cannot run is refused at config time, in one line that
names the values (before any process group or model exists)."""

import pytest
from torchtitan.config import ParallelismConfig

from torchtitan_nemotron3.model import build_model_config, flavor_args
from torchtitan_nemotron3.sharding import check_parallelism

DEBUG = build_model_config(flavor_args("debugmodel"))  # 8 experts
DENSE = build_model_config(
    flavor_args("debugmodel").replace(hybrid_override_pattern="M*M-", num_hidden_layers=None)
)


def _error(model_config=DEBUG, world_size=None, seq_len=None, **degrees) -> str:
    with pytest.raises(ValueError) as info:
        check_parallelism(
            ParallelismConfig(spmd_backend="partial_dtensor", **degrees),
            model_config,
            world_size=world_size,
            seq_len=seq_len,
        )
    message = str(info.value)
    assert "\n" not in message
    return message


def test_expert_parallel_degree_must_divide_the_experts():
    msg = _error(expert_parallel_degree=3, data_parallel_shard_degree=3)
    assert msg == "parallelism.expert_parallel_degree=3 must divide the 8 routed experts"


def test_expert_parallel_needs_moe_layers():
    msg = _error(DENSE, expert_parallel_degree=2)
    assert "expert_parallel_degree=2" in msg and "'M*M-'" in msg and "no MoE" in msg


def test_expert_parallel_borrows_data_parallel_ranks():
    msg = _error(world_size=4, expert_parallel_degree=8)
    assert "expert_parallel_degree=8 must divide" in msg and "4×1×1" in msg


def test_degrees_must_multiply_to_the_world():
    msg = _error(world_size=6, tensor_parallel_degree=4)
    assert "= 4 does not divide the 6 ranks" in msg
    msg = _error(world_size=8, data_parallel_shard_degree=3)
    assert "data_parallel_shard_degree=3" in msg and "!= 8 ranks" in msg


def test_tensor_parallel_degree_must_divide_the_heads():
    # debugmodel: 8 query heads, 2 KV heads, 8 Mamba heads, 2 groups
    msg = _error(tensor_parallel_degree=4)
    assert msg == (
        "parallelism.tensor_parallel_degree=4 must divide num_key_value_heads=2 "
        "(KV heads are not replicated across TP ranks)"
    )


def test_context_parallel_rows_and_combinations():
    msg = _error(seq_len=100, context_parallel_degree=4)
    assert msg == (
        "training.seq_len=100 must be divisible by 8 (2 × context_parallel_degree=4)"
    )
    msg = _error(seq_len=32, context_parallel_degree=8)  # 16 segments of 2 tokens
    assert "2 tokens, fewer than the Mamba2 conv's 3-token history" in msg
    msg = _error(context_parallel_degree=2, context_parallel_load_balancer="ptrr")
    assert "context_parallel_load_balancer='ptrr'" in msg
    msg = _error(context_parallel_degree=2, pipeline_parallel_degree=2)
    assert "context_parallel_degree=2 with pipeline_parallel_degree=2" in msg


def test_other_spmd_backends_are_refused():
    with pytest.raises(ValueError, match="spmd_backend='full_dtensor'"):
        check_parallelism(ParallelismConfig(spmd_backend="full_dtensor"))


def test_valid_layouts_pass():
    for degrees in (
        {},
        {"expert_parallel_degree": 8, "data_parallel_shard_degree": -1},
        {"expert_parallel_degree": 2, "data_parallel_replicate_degree": 2},
        {"tensor_parallel_degree": 2, "expert_parallel_degree": 4},
        {"context_parallel_degree": 4, "expert_parallel_degree": 8},
        {"context_parallel_degree": 2, "context_parallel_load_balancer": None},
    ):
        check_parallelism(
            ParallelismConfig(spmd_backend="partial_dtensor", **degrees),
            DEBUG,
            world_size=8,
            seq_len=256,
        )


def test_nano_config_is_the_anchor_layout_and_builds():
    from torchtitan.models.common.token_dispatcher import (
        AllToAllTokenDispatcher,
        DeepEPTokenDispatcher,
        HybridEPTokenDispatcher,
    )

    from torchtitan_nemotron3 import config_registry

    def dispatchers(config):
        return {
            type(layer.mixer.routed_experts.token_dispatcher)
            for layer in config.model_spec.model.layers
            if layer.layer_type == "E"
        }

    nano = config_registry.nemotron3_nano_30b()  # TorchTitan validates it on build
    assert nano.parallelism.expert_parallel_degree == 8
    assert nano.parallelism.data_parallel_shard_degree == -1
    assert dispatchers(nano) == {AllToAllTokenDispatcher.Config}
    check_parallelism(nano.parallelism, nano.model_spec.model, world_size=8)
    deepep = config_registry.nemotron3_nano_30b_deepep()
    assert dispatchers(deepep) == {DeepEPTokenDispatcher.Config}
    hybridep = config_registry.nemotron3_nano_30b_hybridep()
    assert dispatchers(hybridep) == {HybridEPTokenDispatcher.Config}


@pytest.mark.parametrize("enable_sp", [False, True])
def test_latent_moe_and_the_mtp_block_get_layouts_like_the_main_blocks(enable_sp):
    """Every sub-config TorchTitan's ``parallelize`` reads is declared, the MTP
    block's sub-layers and the latent projections included."""
    from torchtitan_nemotron3.sharding import all_block_configs, set_sharding_config

    cfg = build_model_config(flavor_args("debugmodel-mtp"))
    set_sharding_config(
        cfg,
        ParallelismConfig(
            spmd_backend="partial_dtensor",
            tensor_parallel_degree=2,
            expert_parallel_degree=2,
            enable_sequence_parallel=enable_sp,
        ),
    )
    mtp = cfg.mtp.layers
    assert [layer.layer_type for layer in mtp] == ["*", "E"]
    first, last = mtp
    for norm in (first.enorm, first.hnorm, last.final_layernorm):
        assert norm.sharding_config is not None
    # nn.RMSNorm's argument is ``x``: the replicated hidden state is sliced there.
    assert set(first.hnorm.sharding_config.in_dst_shardings) == {"x"}
    assert first.eh_proj.sharding_config.state_shardings.keys() == {"weight", "bias"}
    assert first.mixer.q_proj.sharding_config is not None
    moe_layers = [b for b in all_block_configs(cfg) if b.layer_type == "E"]
    assert moe_layers[-1] is last and len(moe_layers) == 5 + 1  # "MEM*EM-MEM*EMEM-", "*E"
    for block in [*cfg.layers, *mtp]:
        assert block.norm.sharding_config is not None
    for block in moe_layers:
        moe = block.mixer
        for part in (moe, moe.router.gate, moe.routed_experts.inner_experts,
                     moe.shared_experts.up_proj, moe.fc1_latent_proj,
                     moe.fc2_latent_proj):  # fmt: skip
            assert part.sharding_config is not None
