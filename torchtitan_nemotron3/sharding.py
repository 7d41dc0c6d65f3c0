"""Where NemotronH's tensors live across ranks: which layouts exist, and on which mesh.

Layouts are TorchTitan 0.3.0's: every module ``Config`` carries a ``ShardingConfig``
and ``Module.parallelize(parallel_dims)`` applies it; FSDP2/HSDP then shards what
is left on the data-parallel meshes (``parallelize.py``).

- Data parallel: FSDP2 (``data_parallel_shard_degree``), HSDP
  (``data_parallel_replicate_degree``).
- Expert parallel: TorchTitan's MoE path unchanged (``AllToAllTokenDispatcher``,
  DeepEP/HybridEP by ``moe_comm_backend``), experts ``Shard(0)`` on the ``ep``
  mesh and FSDP-sharded on ``efsdp``; EP borrows its ranks from the data-parallel
  dimensions, so the global batch does not change. Only the relu² shared expert
  needs its own declaration here (TorchTitan's assumes SwiGLU ``w1/w2/w3``).
- Tensor (+ sequence) parallel: ``tensor_parallel.py``.
- Pipeline parallel: ``pipeline.py``.
- Context parallelism: ``model/context_parallel.py`` (the mixers exchange what
  crosses a shard boundary), applied by ``parallelize.py``.
"""

import spmd_types as spmd
from torch.distributed.device_mesh import DeviceMesh
from torchtitan.config import ParallelismConfig
from torchtitan.distributed import ParallelDims
from torchtitan.models.common.decoder_sharding import (
    colwise_config,
    dense_activation_placement,
    dense_sequence_parallel_placement,
    rowwise_config,
)
from torchtitan.models.common.moe_sharding import set_moe_sharding_config
from torchtitan.protocols.sharding import ShardingConfig

from .model.pattern import MAMBA, MOE
from .tensor_parallel import replicated_on_local_tokens_config

# Our relu² routed experts: up (F from D) is colwise, down (D from F) rowwise, when
# TP shards experts without EP.
_RELU2_EXPERTS_TP_LAYOUT = {"w1_EFD": spmd.S(1), "w2_EDF": spmd.S(2)}


def check_parallelism(
    parallelism: ParallelismConfig,
    model_config=None,
    world_size: int | None = None,
    seq_len: int | None = None,
) -> None:
    """Raise ``ValueError`` (one line, naming the values) for a layout NemotronH
    cannot run. ``model_config`` (a ``NemotronHModel.Config``) enables the checks
    against the architecture; ``world_size`` the ones against the rank count;
    ``seq_len`` (``training.seq_len``) the ones against the row length."""
    if parallelism.spmd_backend != "partial_dtensor":
        raise ValueError(
            f"parallelism.spmd_backend={parallelism.spmd_backend!r}: NemotronH's "
            "layouts are declared for spmd_backend='partial_dtensor'"
        )
    cp = parallelism.context_parallel_degree
    if cp > 1:
        _check_context_parallel(parallelism, model_config, seq_len)
    ep, tp = parallelism.expert_parallel_degree, parallelism.tensor_parallel_degree
    if world_size is not None:
        _check_degrees(parallelism, world_size)
    if model_config is None:
        return
    moe_layers = [
        i for i, layer in enumerate(model_config.layers) if layer.layer_type == MOE
    ]
    if ep > 1:
        if not moe_layers:
            raise ValueError(
                f"parallelism.expert_parallel_degree={ep}: the pattern "
                f"{model_config.hybrid_override_pattern!r} has no MoE ('E') layer"
            )
        num_experts = model_config.layers[moe_layers[0]].mixer.num_experts
        if num_experts % ep:
            raise ValueError(
                f"parallelism.expert_parallel_degree={ep} must divide the "
                f"{num_experts} routed experts"
            )
    from .pipeline import check_pipeline_parallel
    from .tensor_parallel import check_tensor_parallel

    check_tensor_parallel(model_config, tp)

    check_pipeline_parallel(model_config, parallelism)


def _check_context_parallel(
    parallelism: ParallelismConfig, model_config, seq_len: int | None
) -> None:
    """CP shards every row into ``2·cp`` segments (head-tail order) or ``cp``
    (no balancer); Mamba2's conv takes its first inputs from the previous
    segment, so a segment must hold at least ``conv_kernel - 1`` tokens."""
    cp, balancer = (
        parallelism.context_parallel_degree,
        parallelism.context_parallel_load_balancer,
    )
    if balancer not in ("headtail", None):
        raise ValueError(
            f"parallelism.context_parallel_load_balancer={balancer!r}: NemotronH's "
            "Mamba2 and attention follow the 'headtail' order or contiguous shards "
            "(None), not a reordering by attention-mask blocks"
        )
    if parallelism.pipeline_parallel_degree > 1:
        raise ValueError(
            f"parallelism.context_parallel_degree={cp} with "
            f"pipeline_parallel_degree={parallelism.pipeline_parallel_degree}: "
            "CP is not wired into NemotronH's pipeline stages yet"
        )
    if model_config is not None and getattr(model_config, "mtp", None) is not None:
        raise ValueError(
            f"parallelism.context_parallel_degree={cp}: multi-token prediction "
            "shifts tokens across shard boundaries and is not CP-aware yet"
        )
    if seq_len is None:
        return
    segments = 2 * cp if balancer == "headtail" else cp
    # TorchTitan's trainer asks 2·cp of every CP layout (and ×tp with SP).
    divisor = 2 * cp * (
        parallelism.tensor_parallel_degree if parallelism.enable_sequence_parallel else 1
    )
    if seq_len % divisor:
        raise ValueError(
            f"training.seq_len={seq_len} must be divisible by {divisor} "
            f"(2 × context_parallel_degree={cp}"
            + (" × tensor_parallel_degree with SP)" if divisor != 2 * cp else ")")
        )
    if model_config is not None:
        mamba = [layer.mixer for layer in model_config.layers if layer.layer_type == MAMBA]
        width = mamba[0].conv1d.kernel_size if mamba else 1
        if seq_len // segments < width - 1:
            raise ValueError(
                f"training.seq_len={seq_len} / {segments} CP segments = "
                f"{seq_len // segments} tokens, fewer than the Mamba2 conv's "
                f"{width - 1}-token history"
            )


def _check_degrees(parallelism: ParallelismConfig, world_size: int) -> None:
    """What ``ParallelDims`` would assert, as one line naming the degrees."""
    p = parallelism
    dp_replicate, cp, tp, pp, ep = (
        p.data_parallel_replicate_degree,
        p.context_parallel_degree,
        p.tensor_parallel_degree,
        p.pipeline_parallel_degree,
        p.expert_parallel_degree,
    )
    others = dp_replicate * cp * tp * pp
    if world_size % others:
        raise ValueError(
            f"parallelism: data_parallel_replicate_degree={dp_replicate} × "
            f"context_parallel_degree={cp} × tensor_parallel_degree={tp} × "
            f"pipeline_parallel_degree={pp} = {others} does not divide the "
            f"{world_size} ranks"
        )
    dp_shard = p.data_parallel_shard_degree
    if dp_shard < 0:
        dp_shard = world_size // others
    if dp_shard * others != world_size:
        raise ValueError(
            f"parallelism: data_parallel_shard_degree={dp_shard} × the other degrees "
            f"({others}) = {dp_shard * others} != {world_size} ranks"
        )
    if ep > 1 and (dp_shard * cp * tp) % ep:
        raise ValueError(
            f"parallelism.expert_parallel_degree={ep} must divide "
            f"data_parallel_shard_degree × context_parallel_degree × "
            f"tensor_parallel_degree = {dp_shard}×{cp}×{tp}: EP borrows its ranks "
            "from those dimensions"
        )


def set_sharding_config(model_config, parallelism: ParallelismConfig) -> None:
    """Fill ``sharding_config`` on every sub-config TorchTitan's ``parallelize``
    reads; axes that are not enabled are filtered out when it runs."""
    enable_ep = parallelism.expert_parallel_degree > 1
    enable_sp = parallelism.enable_sequence_parallel
    from .tensor_parallel import set_dense_sharding_config

    set_dense_sharding_config(model_config, enable_sp=enable_sp)
    for layer in all_block_configs(model_config):
        if layer.layer_type == MOE:
            set_moe_sharding(layer.mixer, enable_ep=enable_ep, enable_sp=enable_sp)


def all_block_configs(model_config) -> list:
    """The main blocks' configs, then the MTP block's sub-layers' (laid out alike)."""
    mtp = getattr(model_config, "mtp", None)
    return [*model_config.layers, *(mtp.layers if mtp is not None else [])]


def set_moe_sharding(moe_cfg, *, enable_ep: bool, enable_sp: bool) -> None:
    """TorchTitan's MoE declarations (router, routed experts, EP dispatch), plus
    the relu² shared expert's, which TorchTitan's helper cannot name, and the
    latent projections'."""
    shared = moe_cfg.shared_experts
    moe_cfg.shared_experts = None
    try:
        set_moe_sharding_config(
            moe_cfg,
            enable_ep=enable_ep,
            enable_sp=enable_sp,
            expert_param_layout=_RELU2_EXPERTS_TP_LAYOUT,
        )
    finally:
        moe_cfg.shared_experts = shared
    if shared is not None:
        _set_shared_expert_sharding(shared, enable_ep=enable_ep, enable_sp=enable_sp)
    if moe_cfg.fc1_latent_proj is not None:
        # Latent MoE: fc1 on the tokens the router sees (before dispatch), fc2 on
        # the routed output in its layout (after combine), weights replicated;
        # the EP all-to-all moves latent-width tokens.
        for proj in (moe_cfg.fc1_latent_proj, moe_cfg.fc2_latent_proj):
            proj.sharding_config = replicated_on_local_tokens_config()


def _set_shared_expert_sharding(mlp_cfg, *, enable_ep: bool, enable_sp: bool) -> None:
    """The shared expert sees the MoE's input and adds into its output: gather the
    input to replicated once, up_proj colwise, down_proj rowwise reduced to the
    layout the routed output has at that point (sequence shards with SP, else a
    partial sum the MoE boundary reduces)."""
    if enable_ep and enable_sp:
        input_layout = dense_sequence_parallel_placement()
    else:
        input_layout = dense_activation_placement(tp=spmd.I if enable_ep else spmd.R)
    mlp_cfg.sharding_config = ShardingConfig(
        in_src_shardings={"x_BLD": input_layout},
        in_dst_shardings={"x_BLD": dense_activation_placement(tp=spmd.R)},
    )
    mlp_cfg.up_proj.sharding_config = colwise_config()
    down = rowwise_config(output_sp=enable_sp)
    if not enable_sp:
        down.out_dst_shardings = dense_activation_placement(tp=spmd.P)
    mlp_cfg.down_proj.sharding_config = down


def data_parallel_mesh(parallel_dims: ParallelDims) -> DeviceMesh:
    """The mesh FSDP2 shards dense parameters on: (replicate, shard) for HSDP."""
    names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
    return parallel_dims.get_mesh(names)


def expert_data_parallel_mesh(parallel_dims: ParallelDims) -> DeviceMesh | None:
    """The mesh FSDP2 shards routed experts on under EP (``efsdp``, with the
    replicate axis for HSDP); ``None`` without EP."""
    if not parallel_dims.ep_enabled:
        return None
    names = (
        ["dp_replicate", "efsdp"] if parallel_dims.dp_replicate_enabled else ["efsdp"]
    )
    return parallel_dims.get_optional_mesh(names)


def apply_layout(model_config, parallelism: ParallelismConfig, seq_len=None) -> None:
    """The model config's layout step before building: check, then declare."""
    check_parallelism(parallelism, model_config, seq_len=seq_len)
    set_sharding_config(model_config, parallelism)


def _register() -> None:
    from .model.model import NemotronHModel

    NemotronHModel.layout_hook = staticmethod(apply_layout)


_register()
