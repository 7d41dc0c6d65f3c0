"""From-scratch initialisation of every parameter and buffer, on a meta-device build."""

import math

import pytest
import torch
import torch.nn.functional as F

from nemotron_testing import build_model
from torchtitan_nemotron3.model import flavor_args


def test_every_tensor_initialised_from_meta():
    args = flavor_args("debugmodel")
    model = build_model(args, seed=0)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert t.device.type == "cpu", name
        assert torch.isfinite(t).all(), name
    # Re-initialising with another seed changes every random parameter: nothing is
    # left as whatever memory ``to_empty`` handed out.
    other = build_model(args, seed=1)
    deterministic = ("norm.weight", ".D", "expert_bias_E", "tokens_per_expert_E")
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        if name.endswith(deterministic):
            assert torch.equal(a, b), name
        else:
            assert not torch.equal(a, b), name


def test_mamba_and_moe_init_values():
    args = flavor_args("debugmodel")
    model = build_model(args)
    L = args.num_hidden_layers
    for block in model.layers.values():
        mixer = block.mixer
        assert torch.all(block.norm.weight == 1)
        if block.layer_type == "M":
            A = torch.exp(mixer.A_log)
            assert torch.all((A >= 1) & (A <= 16))
            assert torch.all(mixer.D == 1)
            dt = F.softplus(mixer.dt_bias)
            assert torch.all(dt >= args.time_step_floor - 1e-7)
            assert torch.all(dt <= args.time_step_max + 1e-6)
            assert torch.all(mixer.norm.weight == 1)
            assert mixer.in_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
            assert mixer.out_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(L), rel=0.1)
        if block.layer_type == "E":
            assert torch.all(mixer.expert_bias_E == 0)
            experts = mixer.routed_experts.inner_experts
            assert experts.w1_EFD.std().item() == pytest.approx(0.02, rel=0.1)
            assert experts.w2_EDF.std().item() == pytest.approx(0.02 / math.sqrt(L), rel=0.1)
    assert model.norm.weight.eq(1).all()
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.05)
