"""Pattern parsing and hyperparameter validation: each bad input names its problem."""

import math

import pytest
import torch

from torchtitan_nemotron3.model import NemotronHArgs, build_model_config, flavor_args
from torchtitan_nemotron3.model.pattern import parse_hybrid_pattern, to_hf_block_types


def test_pattern_symbols_and_separators():
    assert parse_hybrid_pattern("M-M*E") == "M-M*E"
    assert parse_hybrid_pattern("ME|M*|E-", 6) == "MEM*E-"  # pipeline stages dropped


def test_pattern_list_form_round_trips():
    blocks = ["linear_attention", "moe", "full_attention", "mlp"]
    assert parse_hybrid_pattern(blocks) == "ME*-"
    assert to_hf_block_types("ME*-") == blocks
    assert parse_hybrid_pattern(["mamba", "attention"]) == "M*"  # legacy names


def test_bad_character_names_character_and_position():
    with pytest.raises(ValueError, match=r"invalid character 'X' at position 3"):
        parse_hybrid_pattern("MEMX*")


def test_mtp_separator_rejected_with_position():
    with pytest.raises(ValueError, match=r"'/' at position 4 .*MTP"):
        parse_hybrid_pattern("MEM*/*E")


def test_length_mismatch_says_both_numbers():
    with pytest.raises(ValueError, match=r"has 5 layers but num_hidden_layers is 6"):
        parse_hybrid_pattern("MEM*E", 6)
    with pytest.raises(ValueError, match=r"has 5 layers but num_hidden_layers is 4"):
        NemotronHArgs(vocab_size=8, hidden_size=8, hybrid_override_pattern="MEM*E", num_hidden_layers=4)


def test_bad_list_entry():
    with pytest.raises(ValueError, match=r"layers_block_type\[1\] = 'conv'"):
        parse_hybrid_pattern(["mlp", "conv"])


def test_empty_pattern():
    with pytest.raises(ValueError, match="empty"):
        parse_hybrid_pattern("||")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("num_key_value_heads", 3, r"num_key_value_heads=3: must divide num_attention_heads=8"),
        ("n_groups", 3, r"n_groups=3: must divide mamba_num_heads=8"),
        ("num_experts_per_tok", 9, r"num_experts_per_tok=9: must be in \[1, n_routed_experts=8\]"),
        ("n_group", 3, r"n_group=3: must divide n_routed_experts=8"),
        ("tie_word_embeddings", True, r"tie_word_embeddings=True: .*untied"),
        ("moe_latent_size", 0, r"moe_latent_size=0: must be positive"),
        ("num_nextn_predict_layers", 2, r"num_nextn_predict_layers=2: only one stored MTP block"),
        ("mtp_num_layers", 2, r"mtp_num_layers=2: MTP needs num_nextn_predict_layers=1"),
        ("mlp_hidden_act", "silu", r"mlp_hidden_act='silu'"),
        ("time_step_limit", (0.1, 0.01), r"time_step_limit=\(0.1, 0.01\)"),
        ("hidden_size", -8, r"hidden_size=-8: must not be negative"),
        ("n_shared_experts", 2, r"n_shared_experts=2"),
    ],
)
def test_bad_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        flavor_args("debugmodel").replace(**{field: value})


def test_unknown_flavor():
    with pytest.raises(ValueError, match=r"unknown NemotronH flavor 'nano-31B'"):
        flavor_args("nano-31B")


def test_nano_30b_exact_parameter_count_on_meta():
    cfg = build_model_config(flavor_args("nano-30B"))
    with torch.device("meta"):
        model = cfg.build()
    assert sum(p.numel() for p in model.parameters()) == 31_577_937_344
    assert cfg.hybrid_override_pattern.count("M") == 23
    assert [i for i, s in enumerate(cfg.hybrid_override_pattern) if s == "*"] == [
        5, 12, 19, 26, 33, 42,
    ]


def test_nano_30b_flops_per_token():
    from torchtitan_nemotron3.model.flops import active_matmul_params, nparams_and_flops

    cfg = build_model_config(flavor_args("nano-30B"))
    with torch.device("meta"):
        model = cfg.build()
    assert math.isclose(active_matmul_params(cfg), 3.227e9, rel_tol=1e-3)
    assert math.isclose(nparams_and_flops(cfg, model, 4096)[1], 20.16e9, rel_tol=2e-3)
    assert math.isclose(nparams_and_flops(cfg, model, 8192)[1], 20.76e9, rel_tol=2e-3)


def test_debug_flavor_has_every_layer_type_and_multiples_of_8():
    args = flavor_args("debugmodel")
    assert len(args.hybrid_override_pattern) == 16
    assert set(args.hybrid_override_pattern) == set("M*-E")
    assert args.num_experts_per_tok > 1 and args.n_routed_experts > args.num_experts_per_tok
    cfg = build_model_config(args)
    with torch.device("meta"):
        model = cfg.build()
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            dims = p.shape if p.dim() == 2 else p.shape[-2:]
            if "conv1d" in name:
                dims = p.shape[:1]
            assert all(d % 8 == 0 for d in dims), (name, tuple(p.shape))
