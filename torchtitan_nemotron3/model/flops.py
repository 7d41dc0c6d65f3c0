"""Parameters and training FLOPs per token: the count we report MFU with, stated in full.

Training FLOPs per token = 6 x (matmul parameters one token touches: Mamba in/out
projections, attention q/k/v/o, MLP up/down, router + top-k experts + shared expert,
lm_head; not the embedding lookup, not the conv)
+ causal attention: 6 x n_attn_layers x heads x head_dim x seq_len (half of 12·…)
+ the SSD scan, 3 x forward, forward per token and Mamba layer =
  2·G·(Q/2)·N (C·Bᵀ scores, causal half of the chunk)
  + 2·H·(Q/2)·P (scores applied to x within the chunk)
  + 2·H·2·N·P (the chunk state in, the state read out).
For Nemotron-3-Nano-30B-A3B: 3.23e9 active matmul parameters, 20.16 GFLOP/token at
seq_len 4096.
"""

import torch.nn as nn

from .attention import Attention
from .mamba2 import Mamba2Mixer
from .pattern import ATTENTION, MAMBA, MLP, MOE


def _linear_params(cfg) -> int:
    return cfg.in_features * cfg.out_features + (cfg.out_features if cfg.bias else 0)


def active_matmul_params(model_config) -> int:
    total = _linear_params(model_config.lm_head)
    for layer in model_config.layers:
        m = layer.mixer
        if layer.layer_type == MAMBA:
            total += _linear_params(m.in_proj) + _linear_params(m.out_proj)
        elif layer.layer_type == ATTENTION:
            total += sum(_linear_params(p) for p in (m.q_proj, m.k_proj, m.v_proj, m.o_proj))
        elif layer.layer_type == MLP:
            total += _linear_params(m.up_proj) + _linear_params(m.down_proj)
        elif layer.layer_type == MOE:
            experts = m.routed_experts.inner_experts
            total += _linear_params(m.router.gate)
            total += m.router.top_k * 2 * experts.dim * experts.hidden_dim
            shared = m.shared_experts
            total += _linear_params(shared.up_proj) + _linear_params(shared.down_proj)
    return total


def attention_flops_per_token(cfg: Attention.Config, seq_len: int) -> int:
    return 6 * cfg.n_heads * cfg.head_dim * seq_len


def ssd_flops_per_token(cfg: Mamba2Mixer.Config) -> int:
    H, P, N, G = cfg.num_heads, cfg.head_dim, cfg.state_size, cfg.n_groups
    half_q = cfg.chunk_size // 2
    forward = 2 * G * half_q * N + 2 * H * half_q * P + 2 * H * 2 * N * P
    return 3 * forward


def nparams_and_flops(model_config, model: nn.Module, seq_len: int) -> tuple[int, int]:
    """(total parameters incl. every expert, training FLOPs per token)."""
    nparams = sum(p.numel() for p in model.parameters())
    flops = 6 * active_matmul_params(model_config)
    for layer in model_config.layers:
        if layer.layer_type == ATTENTION:
            flops += attention_flops_per_token(layer.mixer, seq_len)
        elif layer.layer_type == MAMBA:
            flops += ssd_flops_per_token(layer.mixer)
    return nparams, flops
