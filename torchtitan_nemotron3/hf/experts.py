"""Split a 3-D expert weight into per-expert 2-D tensors and join them back,
without gathering a sharded weight.

TorchTitan's checkpointer hands the adapter the live FSDP state dict: expert weights
``[E, ...]`` are DTensors sharded on dim 0 (``Shard(0)``: each rank owns a run of
whole experts), or on dim 1 when the FSDP degree exceeds E (``Shard(1)``: every
rank owns a slice of every expert). Each rank must name only the experts it holds
and hand DCP tensors whose global shape and placement describe exactly its piece;
indexing the DTensor (``w[k]``) instead would all-gather.

``MoEStateDictAdapter`` in TorchTitan (models/utils.py) does this for evenly
divided ``Shard``/``_StridedShard`` meshes; it fails on HSDP meshes (it reads
``placement.dim`` of a ``Replicate``) and on uneven shards (it refuses them, and it
rebuilds sub-DTensors without their global shape). Here the local range and shape
come from DTensor's own ``compute_local_shape_and_global_offset``, which covers
``Replicate``, even and uneven ``Shard`` on any dim, and FSDP's strided shard of
the expert dim under expert parallelism (experts ``Shard(0)`` on ``ep``, then
``_StridedShard(0)`` on ``efsdp``: each rank still holds one contiguous run).
"""

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard


@dataclass(frozen=True)
class ExpertLayout:
    """How one rank holds a sharded 3-D expert weight: enough to rebuild it from
    the per-expert pieces after DCP has filled them."""

    mesh: DeviceMesh
    placements: tuple[Placement, ...]
    shape: torch.Size
    stride: tuple[int, ...]
    local_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    first: int  # first expert index held by this rank
    count: int  # number of experts held by this rank

    @property
    def expert_ids(self) -> range:
        return range(self.first, self.first + self.count)


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


def _per_expert_placements(
    mesh: DeviceMesh, placements: tuple[Placement, ...]
) -> tuple[DeviceMesh | None, list[Placement]]:
    """Mesh and placements of one expert's 2-D slice: mesh dims that shard the
    expert dim are used up by the split; the rest keep their meaning, one dim lower."""
    kept_dims, kept = [], []
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, _StridedShard):
            # FSDP over expert parallelism: each EP shard (a run of experts) is
            # split again on efsdp, so a rank still holds one contiguous run.
            if placement.dim != 0:
                raise NotImplementedError(
                    f"expert weights placed as {placement}: strided sharding is "
                    "supported on the expert dim only"
                )
            continue
        if isinstance(placement, Shard):
            if placement.dim == 0:
                continue
            kept.append(Shard(placement.dim - 1))
        elif isinstance(placement, Replicate):
            kept.append(Replicate())
        else:
            raise NotImplementedError(f"expert weights placed as {placement}")
        kept_dims.append(mesh_dim)
    if not kept_dims:
        return None, []
    if len(kept_dims) == mesh.ndim:
        return mesh, kept
    names = mesh.mesh_dim_names
    if names is None:
        raise NotImplementedError("splitting experts needs a mesh with named dims")
    return mesh[tuple(names[d] for d in kept_dims)], kept


def split_experts(
    weight: torch.Tensor,
) -> tuple[dict[int, torch.Tensor], ExpertLayout | None]:
    """``{expert index: 2-D tensor}`` for the experts this rank holds, and the
    layout to rebuild a DTensor (None for a plain tensor).

    Plain tensors give views ``weight[k]`` of all E experts; DTensors give views of
    the local shard, as plain tensors (expert dim fully sharded) or as 2-D
    DTensors on the remaining mesh dims (e.g. ``Shard(1)`` → per expert ``Shard(0)``).
    Views matter: DCP loads into them in place.
    """
    if not isinstance(weight, DTensor):
        return {k: weight[k] for k in range(weight.shape[0])}, None
    mesh, placements = weight.device_mesh, tuple(weight.placements)
    local_shape, offset = compute_local_shape_and_global_offset(
        weight.shape, mesh, placements
    )
    local = weight.to_local()
    if tuple(local.shape) != tuple(local_shape):
        raise ValueError(
            f"local expert shard has shape {tuple(local.shape)}, its placements "
            f"{placements} imply {tuple(local_shape)}"
        )
    layout = ExpertLayout(
        mesh=mesh,
        placements=placements,
        shape=weight.shape,
        stride=weight.stride(),
        local_shape=tuple(local_shape),
        dtype=local.dtype,
        device=local.device,
        first=offset[0],
        count=local_shape[0],
    )
    sub_mesh, sub_placements = _per_expert_placements(mesh, placements)
    pieces = {}
    for k in layout.expert_ids:
        piece = local[k - layout.first]
        if sub_mesh is not None:
            piece = DTensor.from_local(
                piece,
                sub_mesh,
                sub_placements,
                run_check=False,
                shape=weight.shape[1:],
                stride=_contiguous_stride(weight.shape[1:]),
            )
        pieces[k] = piece
    return pieces, layout


def _missing(expected, got) -> str:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    return f"missing experts {missing}" + (
        f", unexpected experts {extra}" if extra else ""
    )


def join_experts(
    pieces: dict[int, torch.Tensor],
    num_experts: int,
    layout: ExpertLayout | None,
    name: str,
) -> torch.Tensor:
    """Stack per-expert pieces back into the 3-D weight; a DTensor laid out as
    recorded by ``split_experts`` when ``layout`` is given.

    Raises ``ValueError`` naming ``name`` and the expert indices when a piece is
    missing or extra: a silently dropped expert would load as garbage.
    """
    expected = range(num_experts) if layout is None else layout.expert_ids
    if sorted(pieces) != list(expected):
        raise ValueError(f"{name}: {_missing(expected, pieces)} (of {num_experts})")
    if layout is None:
        return torch.stack([pieces[k] for k in expected])
    locals_ = [
        p.to_local() if isinstance(p, DTensor) else p
        for p in (pieces[k] for k in expected)
    ]
    if locals_:
        local = torch.stack(locals_)
    else:  # an uneven shard can leave a rank without experts
        local = torch.empty(
            layout.local_shape, dtype=layout.dtype, device=layout.device
        )
    if tuple(local.shape) != layout.local_shape:
        raise ValueError(
            f"{name}: rebuilt local shard has shape {tuple(local.shape)}, expected "
            f"{layout.local_shape}"
        )
    return DTensor.from_local(
        local,
        layout.mesh,
        layout.placements,
        run_check=False,
        shape=layout.shape,
        stride=layout.stride,
    )
