"""Latent MoE (Nemotron-3 Super / Ultra) against transformers' NemotronHForCausalLM.

The router and shared expert see the full width; fc1_latent_proj maps to the latent
width before the routed experts, fc2_latent_proj maps back after them. transformers
(5.23+) implements this, so it is the independent reference: same random weights,
fp32, logits and every gradient to 1e-5 relative, on random tiny configs with all
four layer types.
"""

import pytest
import torch
from nemotron_testing import build_model, hf_reference, random_args, randomize_
from test_parity_hf import load_hf_into_ours, rel_err, run_step

from torchtitan_nemotron3.model import build_model_config, flavor_args
from torchtitan_nemotron3.model.flops import active_matmul_params
from torchtitan_nemotron3.model.pattern import MOE

RTOL = 1e-5


def latent_args(seed: int, n_group: int, latent: int):
    return random_args(seed, n_group=n_group, num_layers=7).replace(
        moe_latent_size=latent
    )


@pytest.mark.parametrize(
    "seed,n_group,latent", [(0, 2, 16), (1, 1, 24), (2, 4, 8), (5, 2, 40)]
)
def test_latent_moe_matches_transformers(seed, n_group, latent):
    args = latent_args(seed, n_group, latent)
    assert set(args.hybrid_override_pattern) == set("M*-E")
    torch.manual_seed(seed)
    hf = hf_reference(args)
    randomize_(hf, seed)
    hf_moe = [n for n in hf.state_dict() if "fc1_latent_proj" in n]
    assert len(hf_moe) == args.hybrid_override_pattern.count(MOE)
    ours = build_model(args)
    mapping = load_hf_into_ours(hf, ours, args)  # asserts equal parameter sets
    moe = next(m for m in ours.modules() if getattr(m, "fc1_latent_proj", None))
    E, F = args.n_routed_experts, args.moe_intermediate_size
    assert moe.routed_experts.inner_experts.w1_EFD.shape == (E, F, latent)
    assert moe.routed_experts.inner_experts.w2_EDF.shape == (E, latent, F)

    tokens = torch.randint(0, args.vocab_size, (2, 3 * args.chunk_size + 5))
    labels = torch.randint(0, args.vocab_size, tokens.shape)
    hf.train()
    ours.train()
    ref_logits = run_step(hf, tokens, labels)
    logits = run_step(ours, tokens, labels)
    assert rel_err(logits, ref_logits) <= RTOL

    ours_params = dict(ours.named_parameters())
    checked = 0
    for hf_name, p in hf.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, hf_name
        for name, rows in mapping[hf_name]:
            err = rel_err(ours_params[name].grad, p.grad[rows])
            assert err <= RTOL, (name, err)
            checked += 1
    assert checked == len(ours_params)


def test_latent_parity_detects_a_wrong_projection():
    """The comparison is sharp for the new weights: perturbing fc2 breaks it."""
    args = latent_args(0, 2, 16)
    hf = hf_reference(args)
    randomize_(hf, 0)
    ours = build_model(args)
    load_hf_into_ours(hf, ours, args)
    layer = args.hybrid_override_pattern.index(MOE)
    with torch.no_grad():
        ours.layers[str(layer)].mixer.fc2_latent_proj.weight.mul_(1.001)
    tokens = torch.randint(0, args.vocab_size, (1, 20))
    with torch.no_grad():
        assert rel_err(ours(tokens), hf(tokens).logits) > RTOL


def test_latent_parameter_and_flop_counts():
    """Per MoE layer: experts E·2·F·Z, router E·H (+ E bias buffer), fc1 + fc2
    2·H·Z, shared 2·H·F_sh; a token's matmuls: router, top-k latent experts,
    fc1, fc2 and the shared expert."""
    args = flavor_args("debugmodel").replace(moe_latent_size=64)
    H, Z, E = args.hidden_size, args.moe_latent_size, args.n_routed_experts
    F, Fs, k = (
        args.moe_intermediate_size,
        args.moe_shared_expert_intermediate_size,
        args.num_experts_per_tok,
    )
    dense_args = args.replace(moe_latent_size=None)
    cfg, dense_cfg = build_model_config(args), build_model_config(dense_args)
    with torch.device("meta"):
        model, dense = cfg.build(), dense_cfg.build()
    n_moe = args.hybrid_override_pattern.count(MOE)

    def nparams(m):
        return sum(p.numel() for p in m.parameters())

    moe_params = E * 2 * F * Z + E * H + 2 * H * Z + 2 * H * Fs + H  # + its norm
    dense_moe_params = E * 2 * F * H + E * H + 2 * H * Fs + H
    assert nparams(model) - nparams(dense) == n_moe * (moe_params - dense_moe_params)
    moe_layer = cfg.layers[args.hybrid_override_pattern.index(MOE)]
    with torch.device("meta"):
        assert nparams(moe_layer.build()) == moe_params

    active = E * H + k * 2 * F * Z + 2 * H * Z + 2 * H * Fs
    dense_active = E * H + k * 2 * F * H + 2 * H * Fs
    assert active_matmul_params(cfg) - active_matmul_params(dense_cfg) == n_moe * (
        active - dense_active
    )
    _, flops = cfg.get_nparams_and_flops(model, 256)
    _, dense_flops = dense_cfg.get_nparams_and_flops(dense, 256)
    assert flops - dense_flops == 6 * n_moe * (active - dense_active)


def test_bad_latent_size_is_named():
    with pytest.raises(ValueError, match=r"moe_latent_size=0: must be positive"):
        flavor_args("debugmodel").replace(moe_latent_size=0)


def test_mtp_under_context_parallelism_is_refused_by_name():
    """MTP under CP fails before building, in one line naming the degree; under
    PP, TP and EP (tests/parallel/test_mtp_parallel.py) it is not refused."""
    from types import SimpleNamespace

    from torchtitan.config import ParallelismConfig

    import torchtitan_nemotron3  # noqa: F401  (registers the layout hook)

    def update(mtp, **degrees):
        args = flavor_args("debugmodel-mtp").replace(mtp_num_layers=mtp)
        config = SimpleNamespace(
            parallelism=ParallelismConfig(spmd_backend="partial_dtensor", **degrees),
            training=SimpleNamespace(seq_len=256),
            debug=None,
        )
        build_model_config(args).update_from_config(config=config)

    with pytest.raises(ValueError, match=r"^parallelism.context_parallel_degree=2: ") as info:
        update(2, context_parallel_degree=2)
    assert "multi-token prediction" in str(info.value)
    assert "\n" not in str(info.value)
    update(0, context_parallel_degree=2)
    for degrees in (
        {"tensor_parallel_degree": 2},
        {"expert_parallel_degree": 2},
        {"pipeline_parallel_degree": 2},
    ):
        update(0, **degrees)
        update(2, **degrees)
