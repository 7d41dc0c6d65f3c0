"""Parameters and training FLOPs per token: the count we report MFU with, stated in full.

Training FLOPs per token = 6 x (matmul parameters one token touches: Mamba in/out
projections, attention q/k/v/o, MLP up/down, router + top-k experts + shared expert
(+ the fc1/fc2 latent projections of a latent MoE, whose experts are latent-wide),
lm_head; with MTP, D times the MTP block's (eh_proj, its layers, lm_head); not the
embedding lookup, not the conv)
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


def _layer_matmul_params(layer) -> int:
    m = layer.mixer
    if layer.layer_type == MAMBA:
        return _linear_params(m.in_proj) + _linear_params(m.out_proj)
    if layer.layer_type == ATTENTION:
        return sum(_linear_params(p) for p in (m.q_proj, m.k_proj, m.v_proj, m.o_proj))
    if layer.layer_type == MLP:
        return _linear_params(m.up_proj) + _linear_params(m.down_proj)
    assert layer.layer_type == MOE
    experts, shared = m.routed_experts.inner_experts, m.shared_experts
    total = _linear_params(m.router.gate)
    # experts.dim is the latent width when fc1/fc2 project into it
    total += m.router.top_k * 2 * experts.dim * experts.hidden_dim
    if getattr(m, "fc1_latent_proj", None) is not None:
        total += _linear_params(m.fc1_latent_proj) + _linear_params(m.fc2_latent_proj)
    return total + _linear_params(shared.up_proj) + _linear_params(shared.down_proj)


def _mtp_layers(model_config) -> list:
    mtp = getattr(model_config, "mtp", None)  # configs from before MTP have none
    return [] if mtp is None else mtp.layers


def active_matmul_params(model_config) -> int:
    """Matmul parameters one token touches in the main model, plus, with MTP,
    each depth's eh_proj, MTP layers and the shared lm_head again."""
    total = _linear_params(model_config.lm_head)
    total += sum(_layer_matmul_params(layer) for layer in model_config.layers)
    mtp = _mtp_layers(model_config)
    if mtp:
        per_depth = _linear_params(mtp[0].eh_proj)
        per_depth += _linear_params(model_config.lm_head)
        per_depth += sum(_layer_matmul_params(layer) for layer in mtp)
        total += model_config.mtp.num_depths * per_depth
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
    mtp = _mtp_layers(model_config)
    depths = model_config.mtp.num_depths if mtp else 0
    for layers, times in ((model_config.layers, 1), (mtp, depths)):
        for layer in layers:
            if layer.layer_type == ATTENTION:
                flops += times * attention_flops_per_token(layer.mixer, seq_len)
            elif layer.layer_type == MAMBA:
                flops += times * ssd_flops_per_token(layer.mixer)
    return nparams, flops
