"""Join the Mamba2 parts into the hub's packed tensors and split them back.

The reverse of ``experts.py``'s case: several of our tensors (``in_proj.z``, ``x``,
``B``, ``C``, ``dt``; ``conv1d.x``, ``B``, ``C``) make one hub tensor
(``in_proj.weight``, ``conv1d.weight``). A rank of a sharded model (FSDP, TP)
holds a run of rows of *each* part, i.e. several disjoint row ranges of the packed
tensor, which no single DTensor placement describes. So the packed tensor handed
to DCP is the full, plain one (gathered from the parts when they are sharded:
the Mamba projections only, at export and initial load); DCP treats it as
replicated (written once, read whole on every rank) and ``unpack`` cuts each
rank's shards back out of it locally.
"""

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor, Placement


@dataclass(frozen=True)
class PartLayout:
    """How one rank holds a sharded part: enough to cut its shard out of the
    full part without communication."""

    mesh: DeviceMesh
    placements: tuple[Placement, ...]


def pack(parts: list[torch.Tensor]) -> tuple[torch.Tensor, list[PartLayout | None]]:
    """The packed tensor (concatenated on dim 0) and each part's layout (None
    for a plain part). Plain parts on ``meta`` stay on ``meta``."""
    layouts, full = [], []
    for part in parts:
        if isinstance(part, DTensor):
            layouts.append(PartLayout(part.device_mesh, tuple(part.placements)))
            full.append(part.full_tensor())
        else:
            layouts.append(None)
            full.append(part)
    return torch.cat(full), layouts


def unpack(
    packed: torch.Tensor,
    sizes: list[int],
    layouts: list[PartLayout | None] | None,
    name: str,
) -> list[torch.Tensor]:
    """The parts of ``packed`` (rows ``sizes``), each a DTensor in its recorded
    layout when one was recorded. Raises ``ValueError`` naming ``name`` when the
    rows do not add up."""
    if packed.shape[0] != sum(sizes):
        raise ValueError(
            f"{name}: packed tensor has {packed.shape[0]} rows, its parts "
            f"{sizes} add up to {sum(sizes)}"
        )
    parts = list(packed.split(sizes))
    if layouts is None:
        return parts
    return [
        part
        if layout is None
        else distribute_tensor(
            part.contiguous(), layout.mesh, list(layout.placements), src_data_rank=None
        )
        for part, layout in zip(parts, layouts, strict=True)
    ]
