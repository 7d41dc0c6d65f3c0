"""The MoE's routing bias is a persistent buffer that TorchTitan's aux-loss-free
load-balancing hook moves towards under-used experts at each optimizer step."""

import socket

import pytest
import torch
import torch.distributed as dist

from nemotron_testing import build_model
from torchtitan.components.optimizer import default_adamw, register_moe_load_balancing_hook
from torchtitan.distributed import ParallelDims
from torchtitan_nemotron3.model import flavor_args
from torchtitan_nemotron3.train import cpu_compat


@pytest.fixture
def single_process_group():
    cpu_compat.apply()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def test_bias_is_persistent_and_moves_towards_underused_experts(single_process_group):
    model = build_model(flavor_args("debugmodel")).train()
    moe_layers = [b.mixer for b in model.layers.values() if b.moe_enabled]
    assert all(f"layers.{i}.mixer.expert_bias_E" in model.state_dict()
               for i, b in model.layers.items() if b.moe_enabled)

    optimizers = default_adamw(lr=1e-3).build(model_parts=[model])
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, world_size=1)
    dims.build_mesh()
    register_moe_load_balancing_hook(optimizers, [model], dims)

    tokens = torch.randint(0, 2048, (2, 64))
    model(tokens).float().logsumexp(-1).mean().backward()
    counts = [moe.tokens_per_expert_E.clone() for moe in moe_layers]
    assert all(c.sum() == 2 * 64 * moe.router.top_k for c, moe in zip(counts, moe_layers))
    optimizers.step()

    for moe, count in zip(moe_layers, counts):
        bias = moe.expert_bias_E
        assert bias.dtype == torch.float32
        below, above = count < count.mean(), count > count.mean()
        assert (bias[below] > bias[above].max()).all()  # under-used experts favoured
        assert torch.all(moe.tokens_per_expert_E == 0)  # counters reset for the next step
