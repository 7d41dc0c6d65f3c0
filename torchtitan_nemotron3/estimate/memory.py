"""Per-GPU memory of a training step: sharded state, FSDP buffers, activations.

State per stored (sharded) parameter element: the fp32 master (``training.dtype``),
its gradient in the same dtype (FSDP2 keeps sharded gradients in the parameter's
dtype), and AdamW's two fp32 moments. FSDP buffers: the all-gathered parameters
of the running unit and the one prefetched next (the largest adjacent pair, in
``mixed_precision_param``), and the largest unit's unsharded gradient in the
reduce dtype before its reduce-scatter. Not counted: CUDA context and NCCL
buffers (~1–3 GiB), allocator fragmentation, compile workspaces.
"""

import itertools
from dataclasses import dataclass

from .activations import Activations
from .shards import CATEGORIES, Shards

ADAMW_STATES = 2


@dataclass
class Memory:
    params: dict  # category -> bytes
    grads: int
    optimizer: int
    gather: int  # all-gather buffers in flight
    reduce: int  # unsharded gradient before reduce-scatter
    activations: int

    @property
    def state(self) -> int:
        return sum(self.params.values()) + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.state + self.gather + self.reduce + self.activations


def estimate(
    shards: Shards,
    acts: Activations,
    *,
    master_bytes: int = 4,
    param_bytes: int = 2,
    reduce_bytes: int = 4,
    optim_bytes: int = 4,
) -> Memory:
    local = sum(shards.local_numel.values())
    sizes = [u.numel for u in shards.units]
    pairs = [a + b for a, b in itertools.pairwise(sizes)] or sizes or [0]
    return Memory(
        params={c: shards.local_numel.get(c, 0) * master_bytes for c in CATEGORIES},
        grads=local * master_bytes,
        optimizer=ADAMW_STATES * local * optim_bytes,
        gather=max(pairs) * param_bytes,
        reduce=max(sizes or [0]) * reduce_bytes,
        activations=acts.total,
    )
