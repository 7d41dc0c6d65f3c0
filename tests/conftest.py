"""Shared fixtures: tiny random NemotronH configs and a transformers reference."""

import math
import random

import pytest
import torch

from torchtitan_nemotron3.model import NemotronHArgs, build_model_config


def random_args(seed: int, *, n_group: int = 2, num_layers: int = 6) -> NemotronHArgs:
    """A small random NemotronH containing every layer type (dims multiples of 8)."""
    rng = random.Random(seed)
    pattern = list("M*-E") + [rng.choice("M*-E") for _ in range(num_layers - 4)]
    rng.shuffle(pattern)
    n_groups = rng.choice([1, 2])
    n_experts = 8 if n_group > 1 else rng.choice([4, 8])
    top_k = rng.choice([2, 3])
    # enough groups that top_k experts are reachable, sometimes more
    topk_group = -(-top_k // (n_experts // n_group)) + rng.choice([0, 1])
    return NemotronHArgs(
        vocab_size=rng.choice([64, 96]),
        hidden_size=rng.choice([32, 48]),
        hybrid_override_pattern="".join(pattern),
        num_attention_heads=4,
        num_key_value_heads=rng.choice([1, 2, 4]),
        head_dim=8,
        mamba_num_heads=4,
        mamba_head_dim=rng.choice([8, 16]),
        ssm_state_size=rng.choice([8, 16]),
        n_groups=n_groups,
        conv_kernel=4,
        chunk_size=rng.choice([8, 16]),
        use_conv_bias=True,
        n_routed_experts=n_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=rng.choice([16, 24]),
        moe_shared_expert_intermediate_size=rng.choice([24, 32]),
        intermediate_size=40,
        n_group=n_group,
        topk_group=min(topk_group, n_group),
        routed_scaling_factor=2.5,
        time_step_min=1e-3,
        # transformers' torch path clamps dt from below at time_step_min; match it.
        time_step_limit=(1e-3, math.inf),
    )


def build_model(args: NemotronHArgs, seed: int = 0, dtype=torch.float32):
    """Our model, on CPU, initialised from scratch (meta build + init_states)."""
    cfg = build_model_config(args)
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_states()
    return model.to(dtype)


@pytest.fixture(params=[0, 1, 2])
def tiny_args(request) -> NemotronHArgs:
    return random_args(request.param)
