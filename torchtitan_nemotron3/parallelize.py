"""Apply TorchTitan's training techniques to NemotronH: AC, per-block compile, FSDP2."""

import torch
import torch.nn as nn

from torchtitan.config import (
    CompileConfig,
    ParallelismConfig,
    TORCH_DTYPE_MAP,
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


class NemotronHSelectiveAC(SelectiveAC):
    """TorchTitan's per-op selective AC, also saving NemotronH's own expensive ops.

    The experts' grouped GEMMs and the CUDA SSD scan are custom ops (so they
    compile), which TorchTitan's save list cannot know about: without this they
    would be recomputed in the backward of every block.
    """

    def get_save_ops(self) -> set:
        import torchtitan_nemotron3.model.grouped_mm  # noqa: F401  (registers the op)

        ops = {torch.ops.nemotron3.grouped_mm.default}
        if hasattr(torch.ops.nemotron3, "mamba_ssd"):  # registered by our kernels
            ops.add(torch.ops.nemotron3.mamba_ssd.default)
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
    """Order matters as in TorchTitan's models: AC wraps each block, compile then
    compiles each (wrapped) block, FSDP shards embeddings, each block (experts on
    their own placement), and norm+lm_head as units last.

    Model parallelism (TP/CP/PP/EP) is not implemented for NemotronH yet and is
    refused in ``update_from_config``; the data-parallel path uses plain DTensor
    FSDP, i.e. ``spmd_backend="partial_dtensor"``.
    """
    if parallelism.spmd_backend != "partial_dtensor":
        raise ValueError(
            f"parallelism.spmd_backend={parallelism.spmd_backend!r}: NemotronH is "
            "data-parallel only (FSDP2) and runs with spmd_backend='partial_dtensor'"
        )

    if ac_config is not None:
        _build_ac(ac_config, dump_folder).apply(model)

    if compile_config.enable and "model" in compile_config.components:
        apply_compile(model, compile_config=compile_config, parallel_dims=parallel_dims)

    # Even on one device FSDP2 is applied, as in TorchTitan's models: it is what
    # gives bf16 compute with fp32 master weights and fp32 gradient reduction.
    dp_mesh_names = (
        ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
    )
    apply_fsdp_to_decoder(
        model,
        parallel_dims.get_mesh(dp_mesh_names),
        param_dtype=TORCH_DTYPE_MAP[training.mixed_precision_param],
        reduce_dtype=TORCH_DTYPE_MAP[training.mixed_precision_reduce],
        pp_enabled=False,
        cpu_offload=training.enable_cpu_offload,
        reshard_after_forward_policy=parallelism.fsdp_reshard_after_forward,
    )
    logger.info(
        f"Applied FSDP2 to NemotronH (params {training.mixed_precision_param}, "
        f"reduce {training.mixed_precision_reduce})"
    )
    return model
