"""Tensor (+ sequence) parallelism for NemotronH's dense path, declared the
TorchTitan 0.3.0 way: a ``ShardingConfig`` on each module config, applied by
``Module.parallelize(parallel_dims)``.

- Embeddings, final norm, lm_head: TorchTitan's ``set_decoder_sharding_config``;
  block norms: ``norm_config``.
- Every mixer gathers its input to replicated once (from sequence shards with SP)
  and its output projection is rowwise: all-reduce, or reduce-scatter back to
  sequence shards with SP. The residual stream stays in the layer layout.
- Mamba2 (Megatron-LM's layout): each part of ``in_proj`` (z, x, B, C, dt) and of
  the conv (x, B, C) colwise by head, ``A_log``/``D``/``dt_bias``/norm weight
  ``Shard(0)``; ``in_proj`` runs as one GEMM under ``local_map`` and the core
  (conv, scan, gated group norm) on local tensors, so a rank owns
  ``mamba_num_heads / tp`` heads and ``n_groups / tp`` whole groups.
- Attention: q/k/v colwise, o rowwise, SDPA under ``local_map`` on local heads
  (the document index stays a plain, replicated, full-length tensor).
- relu² MLP: up colwise, down rowwise (``set_relu2_mlp_sharding``, also for the
  MoE's shared expert).
- MTP block (``set_mtp_sharding``): its sub-layers as the main blocks; the
  fusion's ``eh_proj`` replicated on the local tokens.

MoE layers (router, experts, shared expert) are ``sharding.py``'s.
"""

import spmd_types as spmd
from torchtitan.models.common.decoder_sharding import (
    colwise_config,
    dense_activation_placement,
    dense_param_placement,
    dense_sequence_parallel_placement,
    norm_config,
    pre_lm_head_norm_config,
    rowwise_config,
    set_decoder_sharding_config,
)
from torchtitan.protocols.sharding import LocalMapConfig, ShardingConfig, SpmdLayout

from .model.args import NemotronHArgs
from .model.pattern import ATTENTION, MAMBA, MLP, MOE


def _split_sizes(model) -> dict[str, int]:
    """What TP splits, by ``NemotronHArgs`` field name, from the args or from a
    ``NemotronHModel.Config`` (its layer configs)."""
    if isinstance(model, NemotronHArgs):
        kinds = set(model.hybrid_override_pattern)
        attention = (model.num_attention_heads, model.num_key_value_heads)
        mamba = (model.mamba_num_heads, model.n_groups)
    else:
        mixers = {layer.layer_type: layer.mixer for layer in model.layers}
        kinds, a, m = set(mixers), mixers.get(ATTENTION), mixers.get(MAMBA)
        attention = (a.n_heads, a.n_kv_heads) if a is not None else None
        mamba = (m.num_heads, m.n_groups) if m is not None else None
    sizes = {}
    if ATTENTION in kinds:
        sizes["num_attention_heads"], sizes["num_key_value_heads"] = attention
    if MAMBA in kinds:
        sizes["mamba_num_heads"], sizes["n_groups"] = mamba
    return sizes


def check_tensor_parallel(args: NemotronHArgs, tp: int) -> None:
    """Raise a one-line ``ValueError`` naming the numbers when ``tp`` does not
    divide what tensor parallelism splits: attention heads and KV heads (KV heads
    are not replicated), Mamba heads, and Mamba groups (a gated-norm group, and
    the B/C of its heads, must stay on one rank). ``args`` may also be a
    ``NemotronHModel.Config``."""
    if tp <= 1:
        return
    for name, size in _split_sizes(args).items():
        if size % tp:
            raise ValueError(
                f"parallelism.tensor_parallel_degree={tp} must divide {name}={size}"
                + (
                    " (KV heads are not replicated across TP ranks)"
                    if name == "num_key_value_heads"
                    else ""
                )
            )


def layer_activation_layout(*, enable_sp: bool) -> SpmdLayout:
    """The residual stream between blocks: sequence shards with SP, else
    replicated (TorchTitan's ``I``)."""
    if enable_sp:
        return dense_sequence_parallel_placement()
    return dense_activation_placement(tp=spmd.I)


def _gather_input(arg: str, input_layout: SpmdLayout) -> ShardingConfig:
    """A mixer's own boundary: ``arg`` arrives in ``input_layout`` and is
    gathered to replicated once for all its projections."""
    return ShardingConfig(
        in_src_shardings={arg: input_layout},
        in_dst_shardings={arg: dense_activation_placement(tp=spmd.R)},
    )


def _head_sharded(*names: str) -> ShardingConfig:
    return ShardingConfig(
        state_shardings={n: dense_param_placement(tp=spmd.S(0)) for n in names}
    )


def set_mamba_sharding(mamba_cfg, *, enable_sp: bool) -> None:
    """Mamba2 mixer, sharded by head as Megatron-LM shards it."""
    cfg = _gather_input("x_BLD", layer_activation_layout(enable_sp=enable_sp))
    cfg.state_shardings = {
        n: dense_param_placement(tp=spmd.S(0)) for n in ("A_log", "D", "dt_bias")
    }
    mamba_cfg.sharding_config = cfg
    in_proj = mamba_cfg.in_proj
    for part in ("z", "x", "B", "C", "dt"):
        getattr(in_proj, part).sharding_config = colwise_config()
    # One local GEMM: replicated x in, this rank's packed [z|x|B|C|dt] out; the
    # input's gradient is this rank's partial sum.
    replicated = dense_activation_placement(tp=spmd.R)
    in_proj.sharding_config = ShardingConfig(
        in_src_shardings={"x_BLD": replicated},
        in_dst_shardings={"x_BLD": replicated},
        out_src_shardings=dense_activation_placement(tp=spmd.S(-1)),
        local_map=LocalMapConfig(
            in_grad_placements=(dense_activation_placement(tp=spmd.P),)
        ),
    )
    for part in ("x", "B", "C"):
        getattr(mamba_cfg.conv1d, part).sharding_config = _head_sharded("weight", "bias")
    mamba_cfg.norm.sharding_config = _head_sharded("weight")
    mamba_cfg.out_proj.sharding_config = rowwise_config(output_sp=enable_sp)


def set_attention_sharding(attention_cfg, *, enable_sp: bool) -> None:
    """GQA attention: q/k/v colwise, SDPA on local heads, o rowwise."""
    attention_cfg.sharding_config = _gather_input(
        "x_BLD", layer_activation_layout(enable_sp=enable_sp)
    )
    for proj in (attention_cfg.q_proj, attention_cfg.k_proj, attention_cfg.v_proj):
        proj.sharding_config = colwise_config()
    attention_cfg.o_proj.sharding_config = rowwise_config(output_sp=enable_sp)
    # TorchTitan's set_gqa_inner_attention_local_map, under our argument names
    # (no CP here, so K/V need no gather); seq_idx_BL is keyword-only and plain.
    heads = dense_activation_placement(tp=spmd.S(2))
    qkv = {"q_BLHP": heads, "k_BLHP": heads, "v_BLHP": heads}
    attention_cfg.inner_attention.sharding_config = ShardingConfig(
        in_src_shardings=qkv,
        in_dst_shardings=qkv,
        out_src_shardings=heads,
        local_map=LocalMapConfig(in_grad_placements=(heads, heads, heads)),
    )


def set_relu2_mlp_sharding(
    mlp_cfg, *, input_layout: SpmdLayout, enable_sp: bool
) -> None:
    """relu² MLP (``up_proj``/``down_proj``): input gathered to replicated, up
    colwise, down rowwise to sequence shards (SP) or all-reduced. For the MoE's
    shared expert, pass the MoE input's layout and override
    ``down_proj.sharding_config.out_dst_shardings`` where the MoE combines the
    partial sum itself."""
    mlp_cfg.sharding_config = _gather_input("x_BLD", input_layout)
    mlp_cfg.up_proj.sharding_config = colwise_config()
    mlp_cfg.down_proj.sharding_config = rowwise_config(output_sp=enable_sp)


def set_dense_sharding_config(model_config, *, enable_sp: bool) -> None:
    """Fill ``sharding_config`` on embeddings, final norm, lm_head, every block
    norm and every Mamba, attention and MLP mixer, the MTP block's included. MoE
    mixers (``E``) are left to ``sharding.set_moe_sharding``; their block norm is
    set here."""
    set_decoder_sharding_config(model_config, enable_sp=enable_sp)
    for layer in model_config.layers:
        _set_block_sharding(layer, enable_sp=enable_sp)
    if getattr(model_config, "mtp", None) is not None:
        set_mtp_sharding(model_config.mtp, enable_sp=enable_sp)


def _set_block_sharding(layer, *, enable_sp: bool) -> None:
    layer.norm.sharding_config = norm_config(enable_sp=enable_sp)
    kind, mixer = layer.layer_type, layer.mixer
    if kind == MAMBA:
        set_mamba_sharding(mixer, enable_sp=enable_sp)
    elif kind == ATTENTION:
        set_attention_sharding(mixer, enable_sp=enable_sp)
    elif kind == MLP:
        layout = layer_activation_layout(enable_sp=enable_sp)
        set_relu2_mlp_sharding(mixer, input_layout=layout, enable_sp=enable_sp)
    else:
        assert kind == MOE, kind


def set_mtp_sharding(mtp_cfg, *, enable_sp: bool) -> None:
    """The MTP block's sub-layers as main blocks, in the main blocks' activation
    layout; its own parts:

    - ``hnorm`` takes the previous hidden state, replicated (the root norm or the
      block's ``final_layernorm`` gathered it for ``lm_head``), and slices it back
      to this rank's sequence shard (SP) before normalising;
    - ``enorm`` takes the embedding's output, already in the layer layout;
    - ``eh_proj`` keeps its weight replicated and runs on this rank's tokens, as
      the router gate does: its input is the concatenation [e | h] along the
      hidden dim, which colwise sharding would need gathered first;
    - ``final_layernorm`` gathers to replicated, as the root norm does, for the
      shared ``lm_head`` and the next depth's ``hnorm``."""
    layout = layer_activation_layout(enable_sp=enable_sp)
    for layer in mtp_cfg.layers:
        _set_block_sharding(layer, enable_sp=enable_sp)
        if layer.eh_proj is not None:
            layer.enorm.sharding_config = norm_config(enable_sp=enable_sp)
            hnorm = norm_config(enable_sp=enable_sp)
            # Keyed ``x``: ``nn.RMSNorm.forward``'s argument (TorchTitan's
            # ``norm_config`` keys ``input``, which the norm never receives).
            hnorm.in_src_shardings = {"x": dense_activation_placement(tp=spmd.R)}
            hnorm.in_dst_shardings = {"x": layout}
            layer.hnorm.sharding_config = hnorm
            layer.eh_proj.sharding_config = replicated_on_local_tokens_config()
        if layer.final_layernorm is not None:
            layer.final_layernorm.sharding_config = pre_lm_head_norm_config(
                enable_sp=enable_sp
            )


def replicated_on_local_tokens_config() -> ShardingConfig:
    """A linear whose weight stays whole on every TP rank and which runs on the
    tokens its input holds (sequence shards, or all of them), as TorchTitan's
    router gate: no activation moves; the weight's gradient is summed over TP
    ranks when they hold different tokens. For the MTP fusion and the latent MoE
    projections (``fc1``/``fc2_latent_proj``), whose output keeps the input's
    layout (DTensor's rules keep a partial sum one through the linear map)."""
    return ShardingConfig(
        state_shardings={
            "weight": dense_param_placement(tp=spmd.R),
            "bias": dense_param_placement(tp=spmd.R),
        }
    )
