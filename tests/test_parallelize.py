"""Selective AC for NemotronH keeps the experts' grouped GEMM outputs."""

import torch

from nemotron_testing import build_model
from torchtitan.distributed.activation_checkpoint import SelectiveAC
from torchtitan_nemotron3.model import flavor_args
from torchtitan_nemotron3.parallelize import NemotronHSelectiveAC, _build_ac


def test_selective_ac_saves_the_custom_grouped_gemm():
    ac = _build_ac(SelectiveAC.Config(), dump_folder="")
    assert isinstance(ac, NemotronHSelectiveAC)
    saved = ac.get_save_ops()
    assert torch.ops.nemotron3.grouped_mm.default in saved
    assert SelectiveAC(SelectiveAC.Config()).get_save_ops() < saved


def test_selective_ac_model_trains_like_no_ac():
    args = flavor_args("debugmodel").replace(hybrid_override_pattern="ME*-", num_hidden_layers=None)
    tokens = torch.randint(0, args.vocab_size, (2, 32))
    grads = []
    for use_ac in (False, True):
        model = build_model(args, seed=0).train()
        if use_ac:
            _build_ac(SelectiveAC.Config(), dump_folder="").apply(model)
        model(tokens).float().logsumexp(-1).mean().backward()
        grads.append(
            {n.replace("._checkpoint_wrapped_module", ""): p.grad
             for n, p in model.named_parameters()}
        )
    plain, ac = grads
    assert plain.keys() == ac.keys()
    for name, g in plain.items():
        torch.testing.assert_close(ac[name], g, rtol=1e-5, atol=1e-7)
