"""The ``super-120B`` and ``ultra-550B`` flavors, built on the meta device.

Super's counts are Megatron-Bridge's checkpoint verification (docs/super.md):
123,611,033,088 elements with the MTP block, 120,668,707,840 without, both
counting the fp32 routing biases. Ultra's follow from its config by the same
formula: 560,524,603,904 with MTP, 549,308,993,536 without.
"""

import pytest
import torch

from torchtitan_nemotron3.model import build_model_config, flavor_args
from torchtitan_nemotron3.model.flavors import _ultra_pattern
from torchtitan_nemotron3.model.flops import active_matmul_params
from torchtitan_nemotron3.model.pattern import ATTENTION, MAMBA, MOE

COUNTS = {
    # flavor: (with MTP, without MTP)
    "super-120B": (123_611_033_088, 120_668_707_840),
    "ultra-550B": (560_524_603_904, 549_308_993_536),
}


def elements(args) -> int:
    """Parameters plus the routing-bias buffers (the checkpoint's tensors)."""
    with torch.device("meta"):
        model = build_model_config(args).build()
    biases = sum(
        b.numel() for name, b in model.named_buffers() if name.endswith("expert_bias_E")
    )
    return sum(p.numel() for p in model.parameters()) + biases


def formula(args, mtp: bool) -> int:
    """docs/super.md's per-layer formula (norms included), written out."""
    H, V = args.hidden_size, args.vocab_size
    d_in = args.mamba_num_heads * args.mamba_head_dim
    GN = args.n_groups * args.ssm_state_size
    C = d_in + 2 * GN
    heads = args.mamba_num_heads
    mamba = H * (2 * d_in + 2 * GN + heads) + 4 * C + C + 3 * heads + d_in
    mamba += d_in * H + H
    q, kv = args.num_attention_heads, args.num_key_value_heads
    attention = H * (2 * q + 2 * kv) * args.head_dim + H
    E, I, L = args.n_routed_experts, args.moe_intermediate_size, args.moe_latent_size
    moe = E * 2 * I * L + E * H + E + 2 * H * L
    moe += 2 * H * args.moe_shared_expert_intermediate_size + H
    per = {MAMBA: mamba, ATTENTION: attention, MOE: moe}
    total = 2 * V * H + H + sum(per[s] for s in args.hybrid_override_pattern)
    if mtp:  # enorm, hnorm, eh_proj, the block's layers, final norm
        total += 2 * H + 2 * H * H + H
        total += sum(per[s] for s in args.mtp_hybrid_override_pattern)
    return total


@pytest.mark.parametrize("flavor", sorted(COUNTS))
def test_parameter_counts_on_meta(flavor):
    args = flavor_args(flavor)
    with_mtp, without = COUNTS[flavor]
    assert args.mtp_num_layers == 2 and args.mtp_loss_scaling_factor == 0.3
    assert elements(args) == formula(args, mtp=True) == with_mtp
    no_mtp = args.replace(mtp_num_layers=0)
    assert elements(no_mtp) == formula(no_mtp, mtp=False) == without
    # the depth does not add parameters: one stored block is repeated
    assert elements(args.replace(mtp_num_layers=1)) == with_mtp


def test_super_and_ultra_configs():
    sup, ult = flavor_args("super-120B"), flavor_args("ultra-550B")
    for args, layers, counts in (
        (sup, 88, {MAMBA: 40, MOE: 40, ATTENTION: 8}),
        (ult, 108, {MAMBA: 48, MOE: 48, ATTENTION: 12}),
    ):
        pattern = args.hybrid_override_pattern
        assert args.num_hidden_layers == len(pattern) == layers
        assert {s: pattern.count(s) for s in counts} == counts
        assert args.mtp_hybrid_override_pattern == "*E"
        assert args.num_nextn_predict_layers == 1
        assert (args.n_routed_experts, args.num_experts_per_tok) == (512, 22)
        assert args.routed_scaling_factor == 5.0 and args.n_group == 1
        assert args.moe_latent_size * 4 == args.hidden_size
    assert (sup.moe_intermediate_size, sup.moe_shared_expert_intermediate_size) == (
        2688,
        5376,
    )
    # Ultra's Mamba: 18,432 conv channels = d_inner + 2·G·N
    assert ult.mamba_d_inner + 2 * ult.n_groups * ult.ssm_state_size == 18432


def test_ultra_pattern_rule_reproduces_super():
    """Ultra's pattern is rebuilt from its attention indices by 'Mamba and MoE
    alternate straight through the attention layers'; that rule gives Super's
    published pattern from Super's attention indices."""
    sup = flavor_args("super-120B").hybrid_override_pattern
    attention = [i for i, s in enumerate(sup) if s == ATTENTION]
    assert attention == [7, 16, 25, 36, 47, 58, 69, 78]
    rest = sup.replace(ATTENTION, "")
    assert rest == (MAMBA + MOE) * (len(rest) // 2)
    ult = _ultra_pattern()
    assert [i for i, s in enumerate(ult) if s == ATTENTION] == [
        7,
        14,
        23,
        32,
        39,
        48,
        57,
        64,
        73,
        82,
        89,
        98,
    ]
    assert ult.replace(ATTENTION, "") == (MAMBA + MOE) * 48


def test_super_active_parameters_per_token():
    """docs/super.md: ≈ 12.77B active per token (without MTP, embedding
    included); the matmul count we report MFU with excludes the lookup."""
    args = flavor_args("super-120B").replace(mtp_num_layers=0)
    active = active_matmul_params(build_model_config(args))
    assert 12.6e9 < active + args.vocab_size * args.hidden_size < 12.9e9
