"""Shared test helpers: tiny random NemotronH configs, our model built the way the
trainer builds it, and transformers' model as the independent reference.

(A plain module, not ``conftest.py``: several test folders have their own
conftest, and ``from conftest import ...`` would pick whichever loaded first.)
"""

import math
import random

import torch
from transformers import NemotronHConfig, NemotronHForCausalLM

from torchtitan_nemotron3.model import NemotronHArgs, build_model_config
from torchtitan_nemotron3.model.pattern import to_hf_block_types


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


def build_model(
    args: NemotronHArgs,
    seed: int = 0,
    dtype=torch.float32,
    kernel_backend: str | None = None,
):
    """Our model, on CPU, initialised from scratch (meta build + init_states), as the
    trainer builds it; ``kernel_backend=None`` takes the flavors' default."""
    kwargs = {} if kernel_backend is None else {"kernel_backend": kernel_backend}
    cfg = build_model_config(args, **kwargs)
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_states()
    return model.to(dtype)


def hf_reference(args) -> NemotronHForCausalLM:
    cfg = NemotronHConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        layers_block_type=to_hf_block_types(args.hybrid_override_pattern),
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        mamba_num_heads=args.mamba_num_heads,
        mamba_head_dim=args.mamba_head_dim,
        ssm_state_size=args.ssm_state_size,
        n_groups=args.n_groups,
        conv_kernel=args.conv_kernel,
        use_conv_bias=args.use_conv_bias,
        use_bias=args.use_bias,
        chunk_size=args.chunk_size,
        time_step_min=args.time_step_min,
        n_routed_experts=args.n_routed_experts,
        num_experts_per_tok=args.num_experts_per_tok,
        moe_intermediate_size=args.moe_intermediate_size,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        intermediate_size=args.intermediate_size,
        n_group=args.n_group,
        topk_group=args.topk_group,
        norm_topk_prob=args.norm_topk_prob,
        routed_scaling_factor=args.routed_scaling_factor,
        moe_latent_size=args.moe_latent_size,
        layer_norm_epsilon=args.layer_norm_epsilon,
        tie_word_embeddings=False,
        use_cache=False,
    )
    cfg._attn_implementation = "sdpa"
    return NemotronHForCausalLM(cfg).float()


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights that make every term matter: unit-scale matmuls, non-trivial norms,
    per-head A/D/dt_bias, and a correction bias big enough to change routing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("A_log"):
                new = torch.empty(t.shape).uniform_(1, 16, generator=g).log()
            elif name.endswith("dt_bias"):
                new = torch.randn(t.shape, generator=g) * 0.5 - 2.0
            elif name.endswith(".D"):
                new = torch.randn(t.shape, generator=g)
            elif name.endswith("e_score_correction_bias"):
                new = torch.randn(t.shape, generator=g) * 0.1
            elif t.dim() == 1:  # norms and biases
                new = 1.0 + 0.2 * torch.randn(t.shape, generator=g)
            else:
                fan_in = t.shape[-1]
                new = torch.randn(t.shape, generator=g) / math.sqrt(fan_in)
            t.copy_(new)
