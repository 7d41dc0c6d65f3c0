"""What a context-parallel rank holds of a row, and the collectives the CP layers use.

Under context parallelism (CP) every rank of the ``cp`` group holds ``L / cp``
tokens of each row. TorchTitan (``prepare_context_parallel_input``) shards
``inputs``, ``labels`` and ``positions`` alike, by default with its head-tail load
balancer: the row is cut into ``2·cp`` equal segments and rank r holds segments
r and ``2·cp - 1 - r``, in that order. Without the balancer rank r holds segment
r. ``CPLayout`` names the global segments a rank holds, so layers whose result
depends on token order (Mamba2's conv and scan, attention's causal mask) can
respect that order without moving the activations back into place.

Documents: ``positions`` restart at 0 at each document start, but a rank's shard
starts mid-row, so its document index must be counted over the whole row
(``global_seq_idx``): every CP layer receives these global ids as ``seq_idx``.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist

# torch 2.13 renamed the tensor-to-tensor collectives; older torch has the old names.
_all_gather_single = (
    getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
)
_reduce_scatter_single = (
    getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
)


@dataclass(frozen=True)
class CPLayout:
    """This rank's place in a CP group: which global segments of the row it holds.

    ``load_balanced``: TorchTitan's head-tail order (``context_parallel_load_balancer
    = "headtail"``, its default); False for plain contiguous shards (``None``).
    TorchTitan's other balancer ("ptrr") reorders by attention-mask blocks and is
    not supported.
    """

    group: dist.ProcessGroup
    load_balanced: bool = True

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def n_segments(self) -> int:
        """Segments per rank (each ``L_local / n_segments`` tokens)."""
        return 2 if self.load_balanced else 1

    def segments_of(self, rank: int) -> tuple[int, ...]:
        """Global indices of ``rank``'s segments, in its local order."""
        if self.load_balanced:
            return (rank, 2 * self.size - 1 - rank)
        return (rank,)

    @property
    def segments(self) -> tuple[int, ...]:
        return self.segments_of(self.rank)

    def owner(self, segment: int) -> tuple[int, int]:
        """``(rank, local segment index)`` holding global ``segment``."""
        W = self.size
        if not self.load_balanced:
            return segment, 0
        return (segment, 0) if segment < W else (2 * W - 1 - segment, 1)

    def global_index(
        self, L_local: int, device, rank: int | None = None
    ) -> torch.Tensor:
        """``(L_local,)`` index in the whole row of each of ``rank``'s tokens."""
        S = L_local // self.n_segments
        rank = self.rank if rank is None else rank
        return torch.cat(
            [
                torch.arange(g * S, (g + 1) * S, device=device)
                for g in self.segments_of(rank)
            ]
        )


def all_gather_no_grad(t: torch.Tensor, layout: CPLayout) -> torch.Tensor:
    """``(W, *t.shape)``: every rank's ``t``, rank-major (no autograd)."""
    out = t.new_empty(layout.size * t.shape[0], *t.shape[1:])
    _all_gather_single(out, t.contiguous(), group=layout.group)
    return out.view(layout.size, *t.shape)


class _AllGather(torch.autograd.Function):
    """All-gather along a new leading rank dim; the backward reduce-scatters the
    gradient (each rank's slot summed over the ranks that read it)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        W = dist.get_world_size(group)
        out = t.new_empty(W * t.shape[0], *t.shape[1:])
        _all_gather_single(out, t.contiguous(), group=group)
        return out.view(W, *t.shape)

    @staticmethod
    def backward(ctx, grad_W: torch.Tensor):
        grad = grad_W.new_empty(grad_W.shape[1:])
        _reduce_scatter_single(grad, grad_W.flatten(0, 1).contiguous(), group=ctx.group)
        return grad, None


def all_gather(t: torch.Tensor, layout: CPLayout) -> torch.Tensor:
    """``(W, *t.shape)``: every rank's ``t``, rank-major, differentiable."""
    return _AllGather.apply(t, layout.group)


def global_seq_idx(positions_BL: torch.Tensor, layout: CPLayout) -> torch.Tensor:
    """Document index (int32) of this rank's tokens, counted over the whole row.

    A document starts where ``positions`` is 0 and at the row's first token; the
    index of a token is the number of starts at or before it in the row, minus 1,
    as ``model.seq_idx_from_positions`` gives on the unsharded row. One small
    all-gather of per-segment counts.
    """
    Bsz, L = positions_BL.shape
    nS = layout.n_segments
    S = L // nS
    starts_BnS = (positions_BL == 0).view(Bsz, nS, S).clone()
    if layout.segments[0] == 0:
        starts_BnS[:, 0, 0] = True
    counts_BnS = starts_BnS.sum(-1, dtype=torch.int64)
    counts_WBnS = all_gather_no_grad(counts_BnS, layout)
    # Starts before each global segment: an exclusive prefix sum in global order.
    counts_gB = torch.stack(
        [
            counts_WBnS[layout.owner(g)[0], :, layout.owner(g)[1]]
            for g in range(layout.size * nS)
        ]
    )
    before_gB = torch.cumsum(counts_gB, 0) - counts_gB
    before_BnS = torch.stack([before_gB[g] for g in layout.segments], dim=1)
    ids_BnS = before_BnS[..., None] + torch.cumsum(starts_BnS, -1) - 1
    return ids_BnS.flatten(1).to(torch.int32).contiguous()


def set_context_parallel(model: torch.nn.Module, layout: CPLayout | None) -> int:
    """Put every sequence mixer of ``model`` (the modules with a
    ``set_context_parallel``: Mamba2 and attention) on ``layout`` (None: off);
    returns how many. The per-token layers (MLP, MoE, norms) need nothing."""
    mixers = [
        m
        for m in model.modules()
        if m is not model and hasattr(m, "set_context_parallel")
    ]
    for m in mixers:
        m.set_context_parallel(layout)
    return len(mixers)
