"""Per-GPU memory of a training step: sharded state, FSDP buffers, activations.

State per stored (sharded) parameter element: the fp32 master (``training.dtype``),
its gradient in the same dtype (FSDP2 keeps sharded gradients in the parameter's
dtype), and AdamW's two fp32 moments. FSDP buffers: the all-gathered parameters
of the running unit and the one prefetched next (the largest adjacent pair, in
``mixed_precision_param``), and the largest unit's unsharded gradient in the
reduce dtype before its reduce-scatter. Not counted: CUDA context and NCCL
buffers (~1–3 GiB), allocator fragmentation, compile workspaces.

A LoRA/QLoRA job (``shards.frozen_bytes``): the frozen base is charged at its
stored bytes (bf16, or NF4 for QLoRA's targets) with no gradient and no AdamW
state; only the adapters pay master + gradient + moments. FSDP buffers: a
one-rank shard gathers nothing (torch's world-size-1 path uses the local
tensor; NF4 weights are ignored by FSDP there), so only the adapters' bf16
copies count; with several ranks the frozen base is gathered too, an NF4
tensor FSDP shards (FSDP-QLoRA) at its NF4 bytes (``Group.gather_bytes``);
the reduce buffer holds the adapters' gradients only. QLoRA adds one
dequantized NF4 tensor (the largest: one layer's expert bank) in bf16.
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
    dequant: int = 0  # QLoRA: one NF4 tensor dequantized to bf16 at a time

    @property
    def state(self) -> int:
        return sum(self.params.values()) + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.state + self.gather + self.reduce + self.activations + self.dequant


def estimate(
    shards: Shards,
    acts: Activations,
    *,
    master_bytes: int = 4,
    param_bytes: int = 2,
    reduce_bytes: int = 4,
    optim_bytes: int = 4,
) -> Memory:
    if shards.frozen_bytes or shards.trainable_numel:
        return _estimate_lean(
            shards, acts, master_bytes, param_bytes, reduce_bytes, optim_bytes
        )
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


def _estimate_lean(shards, acts, master_bytes, param_bytes, reduce_bytes, optim_bytes):
    """A frozen base (LoRA/QLoRA): see the module docstring."""
    trainable = sum(shards.trainable_numel.values())

    def gathered(u) -> int:  # bytes
        return sum(
            g.gather_bytes(param_bytes) if g.shard > 1 else g.trainable * param_bytes
            for g in u.groups
        )

    sizes = [gathered(u) for u in shards.units]
    pairs = [a + b for a, b in itertools.pairwise(sizes)] or sizes or [0]
    return Memory(
        params={
            c: shards.trainable_numel.get(c, 0) * master_bytes
            + shards.frozen_bytes.get(c, 0)
            for c in CATEGORIES
        },
        grads=trainable * master_bytes,
        optimizer=ADAMW_STATES * trainable * optim_bytes,
        gather=max(pairs),
        reduce=max([sum(g.trainable for g in u.groups) for u in shards.units] or [0])
        * reduce_bytes,
        activations=acts.total,
        dequant=shards.nf4_transient,
    )
