"""Apply TorchTitan's parallelisms and training techniques to NemotronH: TP/EP
(the modules' declared sharding), AC, per-block compile, FSDP2/HSDP.

Which layouts exist and on which mesh is ``sharding.py``'s; this file applies them
in TorchTitan's order (``models/qwen3/parallelize.py``).
"""

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torchtitan.config import (
    TORCH_DTYPE_MAP,
    CompileConfig,
    ParallelismConfig,
    TrainingConfig,
)
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import (
    ActivationCheckpointingConfig,
    SelectiveAC,
)
from torchtitan.distributed.compile import apply_compile
from torchtitan.distributed.fsdp import apply_fsdp_to_decoder
from torchtitan.tools.logging import logger

from .lora.lean import store_frozen_base
from .model.context_parallel import CPLayout, set_context_parallel

# Registers the custom ops selective AC saves (nemotron3::grouped_mm, ::mamba_ssd).
from .ops import grouped_mm, ssd_kernel  # noqa: F401
from .sharding import data_parallel_mesh, expert_data_parallel_mesh


class NemotronHSelectiveAC(SelectiveAC):
    """TorchTitan's per-op selective AC, also saving NemotronH's own expensive ops.

    The experts' grouped GEMMs and the CUDA SSD scan are custom ops (so they
    compile), which TorchTitan's save list cannot know about: without this they
    would be recomputed in the backward of every block.
    """

    def get_save_ops(self) -> set:
        ops = {
            torch.ops.nemotron3.grouped_mm.default,
            torch.ops.nemotron3.mamba_ssd.default,
        }
        return super().get_save_ops() | ops


def _build_ac(ac_config, dump_folder: str):
    if type(ac_config) is SelectiveAC.Config:
        return NemotronHSelectiveAC(ac_config, dump_folder=dump_folder)
    return ac_config.build(dump_folder=dump_folder)


def parallelize_nemotronh(
    model: nn.Module,
    *,
    parallel_dims: ParallelDims,
    training: TrainingConfig,
    parallelism: ParallelismConfig,
    compile_config: CompileConfig,
    ac_config: ActivationCheckpointingConfig | None,
    dump_folder: str,
) -> nn.Module:
    """Order matters as in TorchTitan's models: TP/EP shard the modules as their
    configs declare, AC wraps each block, compile then compiles each (wrapped)
    block, FSDP shards embeddings, each block (experts on the expert data-parallel
    mesh), and norm+lm_head as units last. The MTP block's sub-layers get what
    the main blocks get. Under PP this runs once per stage. The
    layout was checked when the model config was (``sharding.apply_layout``).
    A LoRA model's frozen base is stored in the compute dtype first
    (``lora/lean.py``: no fp32 master copy of what never trains)."""

    store_frozen_base(model, TORCH_DTYPE_MAP[training.mixed_precision_param])
    nf4_params = _nf4_base(model, parallel_dims)

    if parallel_dims.tp_enabled or parallel_dims.ep_enabled:
        model.parallelize(parallel_dims)

    if parallel_dims.cp_enabled:
        _apply_context_parallel(model, parallel_dims, parallelism)

    # The MTP block's sub-layers are blocks too: TorchTitan's per-block helpers
    # (they walk ``.layers``) run on the block as on a decoder of its own.
    decoders = [model] if getattr(model, "mtp", None) is None else [model, model.mtp]

    if ac_config is not None:
        ac = _build_ac(ac_config, dump_folder)
        for decoder in decoders:
            ac.apply(decoder)

    if compile_config.enable and "model" in compile_config.components:
        for decoder in decoders:
            apply_compile(
                decoder, compile_config=compile_config, parallel_dims=parallel_dims
            )

    # Even on one device FSDP2 is applied, as in TorchTitan's models: it is what
    # gives bf16 compute with fp32 master weights and fp32 gradient reduction.
    # Each MTP sub-layer is its own unit (routed experts on the expert mesh under
    # EP), wrapped before the root.
    dp_mesh = data_parallel_mesh(parallel_dims)
    for decoder in reversed(decoders):
        with _fsdp_ignoring(nf4_params):
            apply_fsdp_to_decoder(
                decoder,
                dp_mesh,
                param_dtype=TORCH_DTYPE_MAP[training.mixed_precision_param],
                reduce_dtype=TORCH_DTYPE_MAP[training.mixed_precision_reduce],
                pp_enabled=parallel_dims.pp_enabled,
                cpu_offload=training.enable_cpu_offload,
                reshard_after_forward_policy=parallelism.fsdp_reshard_after_forward,
                ep_degree=parallel_dims.ep,
                edp_mesh=expert_data_parallel_mesh(parallel_dims),
                enable_symm_mem=parallelism.enable_fsdp_symm_mem,
            )
    if dist.is_initialized() and dist.get_backend() == "gloo":
        _reduce_with_plain_sum(model)
    logger.info(
        f"Applied FSDP2 to NemotronH (params {training.mixed_precision_param}, "
        f"reduce {training.mixed_precision_reduce}, EP {parallel_dims.ep}, "
        f"TP {parallel_dims.tp})"
    )
    return model


def _nf4_base(model: nn.Module, parallel_dims: ParallelDims) -> list[nn.Parameter]:
    """QLoRA (``base_dtype="nf4"``): the NF4 parameters FSDP must leave alone
    (``qlora.transform.nf4_replicated``); the others FSDP2 shards through
    torchao's NF4 all-gather hooks (FSDP-QLoRA: each rank holds 1/dp of the
    base). On a meta model (the trainer's order) the NF4 targets first become
    NF4 placeholders (``qlora.transform.prepare_nf4``), filled after init.
    Only plain FSDP shards NF4; with TP, EP or HSDP the base stays replicated."""
    config = getattr(model, "config", None)
    if getattr(config, "base_dtype", None) != "nf4":
        return []
    from .qlora.transform import nf4_parameters, nf4_replicated, prepare_nf4

    shards = nf4_shard_degree(parallel_dims)
    if any(p.is_meta for p in model.parameters()):
        prepare_nf4(model, lm_head=config.nf4_lm_head, shards=shards)
    replicated = nf4_replicated(model, shards)
    n = len(nf4_parameters(model))
    logger.info(
        f"QLoRA: {n - len(replicated)} NF4 tensors sharded over {shards} FSDP "
        f"rank(s), {len(replicated)} replicated"
    )
    return replicated


def nf4_shard_degree(parallel_dims: ParallelDims) -> int:
    """The FSDP degree QLoRA's NF4 base is sharded over: the FSDP mesh's size
    under plain FSDP (CP folded in), 1 (replicated) with TP, EP or HSDP,
    which the NF4 all-gather hooks are not tested with."""
    if parallel_dims.tp_enabled or parallel_dims.ep_enabled:
        return 1
    if parallel_dims.dp_replicate_enabled:
        return 1
    if not parallel_dims.fsdp_enabled:
        return 1
    return data_parallel_mesh(parallel_dims).size()


@contextlib.contextmanager
def _fsdp_ignoring(params: list[nn.Parameter]):
    """TorchTitan's ``apply_fsdp_to_decoder`` has no ``ignored_params``: its
    ``fully_shard`` calls get them here: the NF4 weights each rank holds whole
    (all of them on one rank, where torch 2.13's FSDP2 skips the NF4
    all-gather hook and fails; a frozen base needs no reduction)."""
    if not params:
        yield
        return
    import torchtitan.distributed.fsdp as tt_fsdp

    plain = tt_fsdp.fully_shard
    ignored = set(params)

    def fully_shard(module, *args, **kwargs):
        kwargs["ignored_params"] = ignored | set(kwargs.get("ignored_params") or ())
        return plain(module, *args, **kwargs)

    tt_fsdp.fully_shard = fully_shard
    try:
        yield
    finally:
        tt_fsdp.fully_shard = plain


def _apply_context_parallel(
    model: nn.Module, parallel_dims: ParallelDims, parallelism: ParallelismConfig
) -> None:
    """Each rank holds the shards of every row TorchTitan's trainer hands it
    (``prepare_context_parallel_input``, head-tail order by default); the model
    counts documents over the whole row and every Mamba2 and attention mixer
    exchanges what crosses a shard boundary (``model/context_parallel.py``).
    TorchTitan's ``apply_cp_to_forward`` is not used: it wraps its own attention
    modules, and Mamba2 needs more than attention does."""
    layout = CPLayout(
        parallel_dims.get_mesh("cp").get_group(),
        load_balanced=parallelism.context_parallel_load_balancer == "headtail",
    )
    model.cp_layout = layout
    n = set_context_parallel(model, layout)
    logger.info(
        f"Applied context parallelism to {n} NemotronH mixers (CP {layout.size}, "
        f"load balancer {parallelism.context_parallel_load_balancer})"
    )


def _reduce_with_plain_sum(model: nn.Module) -> None:
    """Gloo (CPU ranks) has no ``PREMUL_SUM``, which FSDP2 reduce-scatters with once
    TorchTitan sets the gradient divide factor to 1 (the loss is already normalised
    by the global token count). A plain SUM is the same reduction there."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
