"""Where NemotronH's tensors live across ranks: which layouts exist, and on which mesh.

Today NemotronH is data parallel only: FSDP2 (``data_parallel_shard_degree``) and
HSDP (``data_parallel_replicate_degree``); every parameter is sharded on the
data-parallel mesh, the routed experts on their first (expert) dimension as
TorchTitan's ``apply_fsdp_to_decoder`` decides. Tensor, context, pipeline and expert
parallelism are refused here, at config time, with the field that asked for them.
"""

from torch.distributed.device_mesh import DeviceMesh
from torchtitan.config import ParallelismConfig
from torchtitan.distributed import ParallelDims

# Degrees the trainer has that NemotronH does not implement yet.
UNSUPPORTED_DEGREES = (
    "tensor_parallel_degree",
    "context_parallel_degree",
    "pipeline_parallel_degree",
    "expert_parallel_degree",
)


def check_parallelism(parallelism: ParallelismConfig) -> None:
    """Raise ``ValueError`` naming the first parallelism NemotronH cannot run."""
    for name in UNSUPPORTED_DEGREES:
        degree = getattr(parallelism, name)
        if degree > 1:
            raise ValueError(
                f"parallelism.{name}={degree}: NemotronH supports data parallelism "
                "only for now (data_parallel_shard_degree, "
                "data_parallel_replicate_degree); set it to 1"
            )
    if parallelism.spmd_backend != "partial_dtensor":
        raise ValueError(
            f"parallelism.spmd_backend={parallelism.spmd_backend!r}: NemotronH's "
            "FSDP2 path runs with spmd_backend='partial_dtensor'"
        )


def data_parallel_mesh(parallel_dims: ParallelDims) -> DeviceMesh:
    """The mesh FSDP2 shards on: (replicate, shard) for HSDP, else (shard,)."""
    names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
    return parallel_dims.get_mesh(names)
