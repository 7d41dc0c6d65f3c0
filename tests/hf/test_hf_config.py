"""config.json ↔ NemotronHArgs: every spelling in, one transformers loads out."""

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_checkpoints import tiny_args, transformers_model  # noqa: E402

from torchtitan_nemotron3.hf.config import (  # noqa: E402
    args_from_hf_config,
    args_from_model_config,
    hf_config_from_args,
    write_hf_config,
)
from torchtitan_nemotron3.model import build_model_config, flavor_args  # noqa: E402

# nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 as documented in docs/nemotronh.md, in the
# hub's own spelling (pattern string, Infinity literal, RoPE leftovers, remote code).
NANO_HUB_CONFIG = """{
  "architectures": ["NemotronHForCausalLM"],
  "auto_map": {"AutoConfig": "configuration_nemotron_h.NemotronHConfig"},
  "model_type": "nemotron_h", "torch_dtype": "bfloat16",
  "vocab_size": 131072, "hidden_size": 2688, "num_hidden_layers": 52,
  "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
  "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128,
  "attention_bias": false, "attention_dropout": 0.0, "max_position_embeddings": 262144,
  "rope_theta": 10000, "partial_rotary_factor": 1.0,
  "mamba_num_heads": 64, "mamba_head_dim": 64, "ssm_state_size": 128, "n_groups": 8,
  "conv_kernel": 4, "use_conv_bias": true, "use_bias": false, "mamba_proj_bias": false,
  "chunk_size": 128, "expand": 2, "mamba_hidden_act": "silu",
  "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 0.0001,
  "time_step_limit": [0.0, Infinity],
  "n_routed_experts": 128, "num_experts_per_tok": 6, "n_shared_experts": 1,
  "moe_intermediate_size": 1856, "moe_shared_expert_intermediate_size": 3712,
  "n_group": 1, "topk_group": 1, "norm_topk_prob": true, "routed_scaling_factor": 2.5,
  "intermediate_size": 1856, "mlp_hidden_act": "relu2", "mlp_bias": false,
  "layer_norm_epsilon": 1e-05, "residual_in_fp32": false, "rescale_prenorm_residual": true,
  "tie_word_embeddings": false, "initializer_range": 0.02, "hidden_dropout": 0.0,
  "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "use_cache": true,
  "num_logits_to_keep": 1, "use_mamba_kernels": true, "mamba_ssm_cache_dtype": "float32",
  "sliding_window": null, "transformers_version": "4.55.4"
}"""


def test_nano_hub_config_gives_the_nano_flavor():
    assert args_from_hf_config(json.loads(NANO_HUB_CONFIG)) == flavor_args("nano-30B")


def test_config_written_by_transformers(tmp_path):
    """transformers 5.x writes layers_block_type and {"__float__": "Infinity"}."""
    args = tiny_args(0, time_step_limit=(0.0, math.inf))
    transformers_model(args).config.save_pretrained(tmp_path)
    assert args_from_hf_config(tmp_path) == args  # a directory
    assert args_from_hf_config(tmp_path / "config.json") == args  # the file


def test_aliases_and_legacy_spellings():
    config = json.loads(NANO_HUB_CONFIG)
    for old, new in [
        ("mamba_n_groups", "n_groups"),
        ("mamba_d_conv", "conv_kernel"),
        ("mamba_chunk_size", "chunk_size"),
        ("mamba_dt_limit", "time_step_limit"),
        ("mamba_conv_bias", "use_conv_bias"),
    ]:
        config[old] = config.pop(new)
    config["mamba_dt_limit"] = [0.0, "inf"]
    config["layer_types"] = [
        {"M": "mamba", "*": "attention", "E": "moe"}[c]
        for c in config["hybrid_override_pattern"]
    ]
    assert args_from_hf_config(config) == flavor_args("nano-30B")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "llama"}, "model_type='llama'"),
        ({"model_type": None}, "model_type=None"),
        ({"moe_latent_size": 0}, "moe_latent_size=0"),
        ({"num_nextn_predict_layers": 2}, "num_nextn_predict_layers=2"),
        ({"mtp_hybrid_override_pattern": "*E", "mtp_layers_block_type": ["moe"]}, "disagrees with mtp_layers_block_type"),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"num_hidden_layers": 51}, "num_hidden_layers is 51"),
        ({"hybrid_override_pattern": "M*X"}, "invalid character 'X'"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"mlp_hidden_act": "silu"}, "mlp_hidden_act"),
        ({"layers_block_type": ["moe"]}, "disagrees with layers_block_type"),
        ({"n_groups": 8, "mamba_n_groups": 4}, "n_groups twice"),
        ({"time_step_limit": [0.0, "big"]}, "time_step_limit"),
    ],
)
def test_rejected_configs_name_the_field(change, message):
    config = json.loads(NANO_HUB_CONFIG)
    config.update(change)
    with pytest.raises(
        ValueError, match=message.replace("(", r"\(").replace("*", r"\*")
    ):
        args_from_hf_config(config)


def test_missing_pattern_and_missing_file(tmp_path):
    config = json.loads(NANO_HUB_CONFIG)
    del config["hybrid_override_pattern"]
    with pytest.raises(ValueError, match="layer pattern is unknown"):
        args_from_hf_config(config)
    with pytest.raises(FileNotFoundError, match="config.json"):
        args_from_hf_config(tmp_path)


def test_unknown_field_warns():
    config = json.loads(NANO_HUB_CONFIG)
    config["fancy_new_option"] = 3
    with pytest.warns(UserWarning, match="fancy_new_option"):
        assert args_from_hf_config(config) == flavor_args("nano-30B")


@pytest.mark.parametrize("flavor", ["debugmodel", "nano-30B"])
def test_export_round_trips_and_transformers_loads_it(tmp_path, flavor):
    args = flavor_args(flavor)
    assert args_from_hf_config(hf_config_from_args(args)) == args
    assert args_from_model_config(build_model_config(args)) == args

    write_hf_config(tmp_path, args, torch.bfloat16)
    config = transformers.AutoConfig.from_pretrained(tmp_path)  # no trust_remote_code
    assert type(config).__name__ == "NemotronHConfig"
    assert config.hybrid_override_pattern == args.hybrid_override_pattern
    assert config.num_hidden_layers == args.num_hidden_layers
    assert tuple(config.time_step_limit) == args.time_step_limit
    assert config.dtype == torch.bfloat16
    for field in (
        "hidden_size",
        "mamba_num_heads",
        "n_groups",
        "n_routed_experts",
        "moe_intermediate_size",
        "routed_scaling_factor",
        "num_key_value_heads",
    ):
        assert getattr(config, field) == getattr(args, field), field
    # and back through transformers' own writer
    config.save_pretrained(tmp_path / "again")
    assert args_from_hf_config(tmp_path / "again") == args


def test_time_step_limit_round_trips_beyond_transformers(tmp_path):
    """transformers clamps dt at time_step_min whatever the limit says; ours keeps it."""
    args = tiny_args(1, time_step_limit=(1e-4, 50.0))
    assert args_from_hf_config(hf_config_from_args(args)).time_step_limit == (
        1e-4,
        50.0,
    )
