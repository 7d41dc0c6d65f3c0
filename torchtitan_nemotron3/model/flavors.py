"""From flat hyperparameters to TorchTitan module configs, and the named flavors.

Initialisation lives here too (TorchTitan attaches ``param_init`` to each config):
linear weights and embeddings ~ N(0, initializer_range); the projections that write
into the residual stream (Mamba ``out_proj``, attention ``o_proj``, MLP/expert
``down_proj``) are scaled by 1/sqrt(num_layers) when ``rescale_prenorm_residual``;
norms = 1; ``A_log``, ``D``, ``dt_bias`` by ``Mamba2Mixer.reset_parameters``; the
conv by ``nn.Conv1d``'s own default; the expert bias buffer = 0.
"""

import math
from collections.abc import Callable
from functools import partial

import torch.nn as nn

from torchtitan.models.common.embedding import Embedding
from torchtitan.models.common.linear import Linear
from torchtitan.models.common.moe import RoutedExperts
from torchtitan.models.common.nn_modules import Conv1d, RMSNorm
from torchtitan.models.common.config_utils import make_token_dispatcher_config

from .args import NemotronHArgs
from .attention import Attention, DocumentCausalAttention
from .mamba2 import GatedGroupRMSNorm, Mamba2Conv, Mamba2InProj, Mamba2Mixer
from .mlp import ReluSquaredMLP
from .block import NemotronHBlock
from .model import NemotronHModel
from .moe import NemotronHMoE, ReluSquaredGroupedExperts
from .mtp import MTPBlock, MultiTokenPrediction
from .pattern import ATTENTION, MAMBA, MLP, MOE
from .router import router_config

_ONES = {"weight": nn.init.ones_}


def _normal(std: float) -> Callable:
    return partial(nn.init.normal_, mean=0.0, std=std)


def _linear(
    in_features: int, out_features: int, std: float, bias: bool = False
) -> Linear.Config:
    init = {"weight": _normal(std)}
    if bias:
        init["bias"] = nn.init.zeros_
    return Linear.Config(
        in_features=in_features, out_features=out_features, bias=bias, param_init=init
    )


def _mamba(args: NemotronHArgs, std: float, out_std: float, kernel_backend: str):
    D, I, H = args.hidden_size, args.mamba_d_inner, args.mamba_num_heads
    GN = args.n_groups * args.ssm_state_size

    def proj(width: int) -> Linear.Config:
        return _linear(D, width, std, args.use_bias)

    def conv(channels: int) -> Conv1d.Config:
        return Conv1d.Config(
            in_channels=channels,
            out_channels=channels,
            kernel_size=args.conv_kernel,
            groups=channels,
            bias=args.use_conv_bias,
        )

    return Mamba2Mixer.Config(
        num_heads=H,
        head_dim=args.mamba_head_dim,
        state_size=args.ssm_state_size,
        n_groups=args.n_groups,
        # The hub's packed in_proj (z | x | B | C | dt) and conv (x | B | C), one
        # config per part so tensor parallelism shards each part by head.
        in_proj=Mamba2InProj.Config(
            z=proj(I), x=proj(I), B=proj(GN), C=proj(GN), dt=proj(H)
        ),
        conv1d=Mamba2Conv.Config(x=conv(I), B=conv(GN), C=conv(GN)),
        norm=GatedGroupRMSNorm.Config(
            dim=I, n_groups=args.n_groups, eps=args.layer_norm_epsilon
        ),
        out_proj=_linear(I, D, out_std, args.use_bias),
        chunk_size=args.chunk_size,
        time_step_limit=args.time_step_limit,
        time_step_min=args.time_step_min,
        time_step_max=args.time_step_max,
        time_step_floor=args.time_step_floor,
        kernel_backend=kernel_backend,
    )


def _attention(
    args: NemotronHArgs, std: float, out_std: float, backend: str
) -> Attention.Config:
    D, hd = args.hidden_size, args.head_dim
    return Attention.Config(
        n_heads=args.num_attention_heads,
        n_kv_heads=args.num_key_value_heads,
        head_dim=hd,
        q_proj=_linear(D, args.num_attention_heads * hd, std),
        k_proj=_linear(D, args.num_key_value_heads * hd, std),
        v_proj=_linear(D, args.num_key_value_heads * hd, std),
        o_proj=_linear(args.num_attention_heads * hd, D, out_std),
        inner_attention=DocumentCausalAttention.Config(backend=backend),
    )


def _mlp(D: int, hidden: int, std: float, out_std: float, bias: bool):
    return ReluSquaredMLP.Config(
        up_proj=_linear(D, hidden, std, bias), down_proj=_linear(hidden, D, out_std, bias)
    )


def _moe(
    args: NemotronHArgs, std: float, out_std: float, comm_backend: str
) -> NemotronHMoE.Config:
    D, E, S = args.hidden_size, args.n_routed_experts, args.moe_latent_size
    latent = S is not None
    # Routed experts work in the latent width when there is one; then fc2, not the
    # experts' down projection, writes into the residual stream and is scaled.
    expert_dim = S if latent else D
    expert_out_std = std if latent else out_std
    return NemotronHMoE.Config(
        num_experts=E,
        router=router_config(args, _normal(std)),
        routed_experts=RoutedExperts.Config(
            inner_experts=ReluSquaredGroupedExperts.Config(
                dim=expert_dim,
                hidden_dim=args.moe_intermediate_size,
                num_experts=E,
                param_init={"w1_EFD": _normal(std), "w2_EDF": _normal(expert_out_std)},
            ),
            # TorchTitan's dispatcher for the backend: "standard" all-to-all
            # (local when there is no EP mesh), or DeepEP/HybridEP on GPUs; it
            # moves expert_dim-wide tokens.
            token_dispatcher=make_token_dispatcher_config(
                num_experts=E,
                top_k=args.num_experts_per_tok,
                comm_backend=comm_backend,
                hidden_dim=expert_dim,
            ),
        ),
        load_balance_coeff=args.load_balance_coeff,
        seq_aux_loss_coeff=args.moe_seq_aux_loss_coeff,
        shared_experts=_mlp(
            D, args.moe_shared_expert_intermediate_size, std, out_std, args.mlp_bias
        ),
        fc1_latent_proj=_linear(D, S, std, args.mlp_bias) if latent else None,
        fc2_latent_proj=_linear(S, D, out_std, args.mlp_bias) if latent else None,
    )


def build_model_config(
    args: NemotronHArgs,
    kernel_backend: str = "auto",
    moe_comm_backend: str = "standard",
    attn_backend: str = "auto",
) -> NemotronHModel.Config:
    """The module-config tree for ``args``: one block config per pattern symbol.

    ``kernel_backend`` picks the Mamba2 conv/scan ops (``ops.mamba_ops``): "auto"
    uses mamba-ssm / causal-conv1d kernels on CUDA tensors when installed and is
    exactly the torch path otherwise; "torch" and "cuda" force one side.
    ``moe_comm_backend`` is TorchTitan's token-dispatch backend for expert
    parallelism ("standard", "deepep", "hybridep", "minimal_async_ep").
    ``attn_backend`` runs attention (``attention.DocumentCausalAttention``):
    "sdpa" (exact, dense document mask: the CPU path), "flex" (FlexAttention with
    a document block mask), "varlen" (flash varlen, no CP), or "auto": flex on
    CUDA tensors, sdpa elsewhere; an unknown name raises ``ValueError``."""
    D, std = args.hidden_size, args.initializer_range
    out_std = std / math.sqrt(args.num_hidden_layers) if args.rescale_prenorm_residual else std

    def norm(dim: int) -> RMSNorm.Config:
        return RMSNorm.Config(
            normalized_shape=dim, eps=args.layer_norm_epsilon, param_init=_ONES
        )

    def mixer(symbol: str):
        if symbol == MAMBA:
            return _mamba(args, std, out_std, kernel_backend)
        if symbol == ATTENTION:
            return _attention(args, std, out_std, attn_backend)
        if symbol == MLP:
            return _mlp(D, args.intermediate_size, std, out_std, args.mlp_bias)
        assert symbol == MOE
        return _moe(args, std, out_std, moe_comm_backend)

    return NemotronHModel.Config(
        vocab_size=args.vocab_size,
        dim=D,
        tok_embeddings=Embedding.Config(
            num_embeddings=args.vocab_size,
            embedding_dim=D,
            param_init={"weight": _normal(std)},
        ),
        layers=[
            NemotronHBlock.Config(layer_type=s, norm=norm(D), mixer=mixer(s))
            for s in args.hybrid_override_pattern
        ],
        norm=norm(D),
        lm_head=_linear(D, args.vocab_size, std),
        pipeline_segments=args.pipeline_segments,
        mtp=_mtp(args, norm, mixer, std),
    )


def _mtp(
    args: NemotronHArgs, norm, mixer, std: float
) -> MultiTokenPrediction.Config | None:
    """The stored MTP block when MTP is on (``mtp_num_layers`` > 0): one sub-layer
    per symbol of ``mtp_hybrid_override_pattern``, the first with the
    embedding/hidden fusion, the last with the final norm."""
    if not args.mtp_num_layers:
        return None
    D, pattern = args.hidden_size, args.mtp_hybrid_override_pattern
    layers = []
    for i, symbol in enumerate(pattern):
        first, last = i == 0, i == len(pattern) - 1
        layers.append(
            MTPBlock.Config(
                layer_type=symbol,
                norm=norm(D),
                mixer=mixer(symbol),
                enorm=norm(D) if first else None,
                hnorm=norm(D) if first else None,
                eh_proj=_linear(2 * D, D, std) if first else None,
                final_layernorm=norm(D) if last else None,
            )
        )
    return MultiTokenPrediction.Config(
        num_depths=args.mtp_num_layers,
        layers=layers,
        loss_scaling_factor=args.mtp_loss_scaling_factor,
    )


# nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16, config.json.
NANO_30B = NemotronHArgs(
    vocab_size=131072,
    hidden_size=2688,
    hybrid_override_pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
    num_hidden_layers=52,
    num_attention_heads=32,
    num_key_value_heads=2,
    head_dim=128,
    mamba_num_heads=64,
    mamba_head_dim=64,
    ssm_state_size=128,
    n_groups=8,
    conv_kernel=4,
    chunk_size=128,
    n_routed_experts=128,
    num_experts_per_tok=6,
    moe_intermediate_size=1856,
    moe_shared_expert_intermediate_size=3712,
    intermediate_size=1856,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=2.5,
)

# 16 layers with every layer type, 8 experts top-2, every matmul dim a multiple of 8;
# a training step takes well under a second on 2 CPU cores at seq_len 256.
DEBUG = NemotronHArgs(
    vocab_size=2048,
    hidden_size=256,
    hybrid_override_pattern="MEM*EM-MEM*EMEM-",
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    mamba_num_heads=8,
    mamba_head_dim=32,
    ssm_state_size=32,
    n_groups=2,
    conv_kernel=4,
    chunk_size=64,
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    moe_shared_expert_intermediate_size=256,
    intermediate_size=512,
    routed_scaling_factor=2.5,
)

# nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16, config.json (docs/super.md): latent
# MoE, one stored MTP block ("*E") that training applies twice with λ = 0.3, as
# NVIDIA's Megatron-Bridge recipe does. 123,611,033,088 parameters and routing
# biases with MTP, 120,668,707,840 without (mtp_num_layers=0).
SUPER_120B = NemotronHArgs(
    vocab_size=131072,
    hidden_size=4096,
    hybrid_override_pattern=(
        "MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*"
        "EMEMEMEM*EMEMEMEME"
    ),
    num_hidden_layers=88,
    num_attention_heads=32,
    num_key_value_heads=2,
    head_dim=128,
    mamba_num_heads=128,
    mamba_head_dim=64,
    ssm_state_size=128,
    n_groups=8,
    conv_kernel=4,
    chunk_size=128,
    n_routed_experts=512,
    num_experts_per_tok=22,
    moe_intermediate_size=2688,
    moe_shared_expert_intermediate_size=5376,
    moe_latent_size=1024,
    intermediate_size=2688,  # no dense '-' layers: unused
    n_group=1,
    topk_group=1,
    routed_scaling_factor=5.0,
    num_nextn_predict_layers=1,
    mtp_hybrid_override_pattern="*E",
    mtp_num_layers=2,
    mtp_loss_scaling_factor=0.3,
)


def _ultra_pattern() -> str:
    """Ultra's 108 layers: attention at the 12 indices its configs publish, the
    rest alternating Mamba and MoE straight through them (the rule Super's
    published pattern follows too; tests/model/test_super_flavors.py checks it)."""
    attention = {7, 14, 23, 32, 39, 48, 57, 64, 73, 82, 89, 98}
    symbols, other = [], 0
    for i in range(108):
        if i in attention:
            symbols.append(ATTENTION)
        else:
            symbols.append((MAMBA, MOE)[other])
            other ^= 1
    return "".join(symbols)


# nvidia/NVIDIA-Nemotron-3-Ultra-550B-A55B-BF16, from copies of its config.json
# (docs/super.md; the Mamba head dim 64 follows from its 18,432 conv channels).
# Verify against the released config.json before relying on it.
ULTRA_550B = SUPER_120B.replace(
    hidden_size=8192,
    hybrid_override_pattern=_ultra_pattern(),
    num_hidden_layers=108,
    num_attention_heads=64,
    num_key_value_heads=2,
    head_dim=128,
    mamba_num_heads=256,
    mamba_head_dim=64,
    moe_intermediate_size=5120,
    moe_shared_expert_intermediate_size=10240,
    moe_latent_size=2048,
    intermediate_size=5120,  # no dense '-' layers: unused
)

# The debug model with Super's two features: latent MoE (256 → 128) and one MTP
# block ("*E") applied twice.
DEBUG_MTP = DEBUG.replace(
    moe_latent_size=128,
    num_nextn_predict_layers=1,
    mtp_hybrid_override_pattern="*E",
    mtp_num_layers=2,
    mtp_loss_scaling_factor=0.3,
)

FLAVORS: dict[str, NemotronHArgs] = {
    "debugmodel": DEBUG,
    "debugmodel-mtp": DEBUG_MTP,
    "nano-30B": NANO_30B,
    "super-120B": SUPER_120B,
    "ultra-550B": ULTRA_550B,
}


def flavor_args(flavor: str) -> NemotronHArgs:
    if flavor not in FLAVORS:
        raise ValueError(f"unknown NemotronH flavor {flavor!r}; choose from {sorted(FLAVORS)}")
    return FLAVORS[flavor]
