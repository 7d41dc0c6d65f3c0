"""Mamba2 under context parallelism: exact, by passing conv inputs and SSD states.

Each rank holds segments of every row (``context_parallel.CPLayout``: TorchTitan's
head-tail order, or contiguous) and runs the mixer's own ops on them, as if each
segment were a document of its own; what crosses a segment boundary is then
supplied from the ranks holding the earlier segments:

* **conv**: the ``K - 1`` inputs before each segment (the previous segment's tail,
  gathered from its owner) are prepended as a halo, with their global document ids,
  so a tap reading an earlier document is dropped exactly as on the whole row.
* **scan**: each segment is scanned from a zero state. The state entering it is
  the SSD's chunk recurrence one level up: with ``h_final(g)`` the state segment g
  ends with from zero and ``decay(g)`` its total decay (0 if a document starts in
  it), ``h_in(g) = decay(g-1)·h_in(g-1) + h_final(g-1)``, ``h_in(0) = 0``. The
  tokens before the segment's first document start then add
  ``C_t · exp(a_1 + ... + a_t) · h_in`` (linearity of the recurrence in its state).

Why state passing rather than Megatron's all-to-all to head shards: it moves
states (``B·H·P·N`` per segment) and ``K - 1`` tokens, not the whole ``z|x|B|C|dt``
activation twice per layer; it works with any head and group count (the all-to-all
needs heads and groups divisible by TP × CP); and it is the scan's own chunk
algorithm one level up, so the kernels run unchanged on each shard (any backend,
under tensor parallelism too: only local heads are touched).

Token order: segments stay where TorchTitan put them (no reordering); the halo
and the state recurrence follow the segments' global order (``CPLayout.owner``).
Documents: ``seq_idx`` must be the global document ids of this rank's tokens
(``context_parallel.global_seq_idx``), None meaning one document per row.
"""

import torch
import torch.nn.functional as F

from ..ops.torch_ops import MambaOps
from .context_parallel import CPLayout, all_gather_no_grad


def _global_ids(
    seq_idx_BL: torch.Tensor | None, Bsz: int, L: int, device
) -> torch.Tensor:
    if seq_idx_BL is None:
        return torch.zeros(Bsz, L, dtype=torch.int32, device=device)
    return seq_idx_BL.to(torch.int32)


def _rev_cumsum_exclusive(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``out[s] = t[s+1] + ... + t[-1]`` along ``dim``, summed from the end (no
    difference of large sums: exact where it matters, near the end)."""
    inclusive = torch.flip(torch.cumsum(torch.flip(t, (dim,)), dim), (dim,))
    rest = inclusive.narrow(dim, 1, t.size(dim) - 1)
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, 1]
    return F.pad(rest, pad)


class ContextParallelMambaOps:
    """``MambaOps`` over a CP shard: wraps the mixer's ops (torch or kernels) with
    the halo exchange (conv) and the state passing (scan); ``gated_norm`` is per
    token and passes through."""

    def __init__(self, ops: MambaOps, layout: CPLayout):
        self.inner = ops
        self.layout = layout
        self.name = f"cp:{ops.name}"

    def _segments(self, L: int, min_len: int) -> tuple[int, int]:
        nS = self.layout.n_segments
        if L % nS or L // nS < min_len:
            raise ValueError(
                f"context parallel Mamba2: {L} local tokens must split into {nS} "
                f"segments of at least {min_len} tokens"
            )
        return nS, L // nS

    def conv(self, xBC_BLX, weight_XK, bias_X, seq_idx_BL):
        lay = self.layout
        Bsz, L, _ = xBC_BLX.shape
        halo = weight_XK.size(-1) - 1
        nS, S = self._segments(L, halo)
        ids_BnSS = _global_ids(seq_idx_BL, Bsz, L, xBC_BLX.device).unflatten(1, (nS, S))
        x_BnSSX = xBC_BLX.unflatten(1, (nS, S))
        halos_BnSKX = _HaloExchange.apply(x_BnSSX[:, :, S - halo :], lay)
        tail_ids_WBnSK = all_gather_no_grad(ids_BnSS[:, :, S - halo :], lay)
        pieces, id_pieces = [], []
        for j, g in enumerate(lay.segments):
            pieces += [halos_BnSKX[:, j], x_BnSSX[:, j]]
            # Before the row's start: the exchange's zeros, ids no document has.
            if g == 0:
                id_pieces.append(ids_BnSS.new_full((Bsz, halo), -1))
            else:
                w, k = lay.owner(g - 1)
                id_pieces.append(tail_ids_WBnSK[w, :, k])
            id_pieces.append(ids_BnSS[:, j])
        out_BEX = self.inner.conv(
            torch.cat(pieces, 1),
            weight_XK,
            bias_X,
            torch.cat(id_pieces, 1).contiguous(),
        )
        E = S + halo
        return torch.cat([out_BEX[:, j * E + halo : (j + 1) * E] for j in range(nS)], 1)

    def scan(
        self,
        x_BLHP,
        dt_BLH,
        A_H,
        B_BLGN,
        C_BLGN,
        *,
        D_H,
        dt_bias_H,
        dt_limit,
        chunk_size,
        seq_idx_BL,
    ):
        Bsz, L = x_BLHP.shape[:2]
        nS, S = self._segments(L, 1)
        ids_BL = _global_ids(seq_idx_BL, Bsz, L, x_BLHP.device)
        # Local scan, every segment from a zero state: the ids of local segment j
        # are shifted by j, so segment 1 never continues segment 0.
        seg_L = torch.arange(
            nS, device=ids_BL.device, dtype=torch.int32
        ).repeat_interleave(S)
        y_BLHP = self.inner.scan(
            x_BLHP,
            dt_BLH,
            A_H,
            B_BLGN,
            C_BLGN,
            D_H=D_H,
            dt_bias_H=dt_bias_H,
            dt_limit=dt_limit,
            chunk_size=chunk_size,
            seq_idx_BL=(ids_BL + seg_L).contiguous(),
        )
        y_in_BLHP = incoming_state_output(
            x_BLHP,
            dt_BLH,
            A_H,
            B_BLGN,
            C_BLGN,
            dt_bias_H,
            dt_limit,
            ids_BL,
            self.layout,
        )
        return y_BLHP + y_in_BLHP.to(y_BLHP.dtype)

    def gated_norm(self, y_BLI, z_BLI, weight_I, *, eps, n_groups):
        return self.inner.gated_norm(y_BLI, z_BLI, weight_I, eps=eps, n_groups=n_groups)


def incoming_state_output(
    x_BLHP: torch.Tensor,
    dt_BLH: torch.Tensor,
    A_H: torch.Tensor,
    B_BLGN: torch.Tensor,
    C_BLGN: torch.Tensor,
    dt_bias_H: torch.Tensor | None,
    dt_limit: tuple[float, float],
    ids_BL: torch.Tensor,
    layout: CPLayout,
) -> torch.Tensor:
    """What this rank's tokens read from the states entering its segments, in the
    compute dtype (fp32, or fp64 for fp64 inputs); see the module docstring.

    ``dt`` is raw (softplus(dt + dt_bias), clamped, as the ops' scan). Decays are
    cumulative sums of finite ``a = dt·A`` (document starts are masks, never
    -inf), summed from the segment's start (reading the incoming state) or its end
    (the final state), so no large sums are subtracted.
    """
    lay = layout
    Bsz, L, H, P = x_BLHP.shape
    G, N = B_BLGN.shape[-2:]
    R = H // G
    nS = lay.n_segments
    S = L // nS
    cd = torch.float64 if x_BLHP.dtype == torch.float64 else torch.float32
    dt_BLH = dt_BLH.to(cd)
    if dt_bias_H is not None:
        dt_BLH = dt_BLH + dt_bias_H.to(cd)
    dt_BLH = F.softplus(dt_BLH)
    lo, hi = dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt_BLH = dt_BLH.clamp(min=lo, max=hi)
    a_BjSGR = (dt_BLH * A_H.to(cd)).view(Bsz, nS, S, G, R)
    dt_BjSGR = dt_BLH.view(Bsz, nS, S, G, R)
    x_BjSGRP = x_BLHP.to(cd).view(Bsz, nS, S, G, R, P)
    B_BjSGN = B_BLGN.to(cd).view(Bsz, nS, S, G, N)
    C_BjSGN = C_BLGN.to(cd).view(Bsz, nS, S, G, N)

    # Document starts, the first token included: it starts one unless it continues
    # the last token of the previous segment (on its owner; the row's start always).
    ids_BjS = ids_BL.view(Bsz, nS, S)
    last_WBj = all_gather_no_grad(ids_BjS[:, :, -1], lay)
    prev_last_Bj = torch.stack(
        [
            last_WBj[lay.owner(g - 1)[0], :, lay.owner(g - 1)[1]]
            if g > 0
            else torch.full_like(ids_BjS[:, 0, 0], -1)
            for g in lay.segments
        ],
        dim=1,
    )
    starts_BjS = torch.cat(
        [
            (ids_BjS[:, :, :1] != prev_last_Bj[..., None]),
            ids_BjS[:, :, 1:] != ids_BjS[:, :, :-1],
        ],
        dim=-1,
    )

    # Final state from zero: tokens with no start after them, decayed to the end.
    none_after_BjS = _rev_cumsum_exclusive(starts_BjS.int(), dim=2) == 0
    to_end_BjSGR = _rev_cumsum_exclusive(a_BjSGR, dim=2)
    w_BjSGR = torch.where(
        none_after_BjS[..., None, None], torch.exp(to_end_BjSGR) * dt_BjSGR, 0.0
    )
    h_final_BjGRPN = torch.einsum(
        "bjsgr,bjsgrp,bjsgn->bjgrpn", w_BjSGR, x_BjSGRP, B_BjSGN
    )
    cs_BjSGR = torch.cumsum(a_BjSGR, dim=2)
    no_start_Bj = ~starts_BjS.any(-1)
    decay_BjGR = torch.where(
        no_start_Bj[..., None, None], torch.exp(cs_BjSGR[:, :, -1]), 0.0
    )

    h_in_BjGRPN = _StatePassing.apply(h_final_BjGRPN, decay_BjGR, lay)

    # Tokens before the segment's first document start read the incoming state.
    before_first_BjS = torch.cumsum(starts_BjS.int(), dim=-1) == 0
    w_in_BjSGR = torch.where(
        before_first_BjS[..., None, None], torch.exp(cs_BjSGR), 0.0
    )
    y_BjSGRP = (
        torch.einsum("bjsgn,bjgrpn->bjsgrp", C_BjSGN, h_in_BjGRPN)
        * w_in_BjSGR[..., None]
    )
    return y_BjSGRP.reshape(Bsz, L, H, P)


def _states_entering(
    h_final_WBjGRPN: torch.Tensor, decay_WBjGR: torch.Tensor, layout: CPLayout
) -> torch.Tensor:
    """``h_in`` of every rank's segments, ``(W, B, nS, G, R, P, N)``: the exclusive
    scan ``h_in(g+1) = decay(g)·h_in(g) + h_final(g)`` in global segment order."""
    h_BGRPN = torch.zeros_like(h_final_WBjGRPN[0, :, 0])
    h_in = []
    for g in range(layout.size * layout.n_segments):
        h_in.append(h_BGRPN)
        w, k = layout.owner(g)
        h_BGRPN = (
            decay_WBjGR[w, :, k, ..., None, None] * h_BGRPN + h_final_WBjGRPN[w, :, k]
        )
    return torch.stack(
        [
            torch.stack([h_in[g] for g in layout.segments_of(w)], dim=1)
            for w in range(layout.size)
        ]
    )


class _StatePassing(torch.autograd.Function):
    """This rank's incoming states from every rank's final states and decays.

    One collective each way, always run by every rank (its output is always read,
    so the backward runs even where the incoming state is zero): the forward
    all-gathers ``(h_final, decay)``, the backward all-gathers ``dh_in`` and
    differentiates the (tiny, ``2·cp``-step) recurrence redundantly on each rank.
    A single function keeps the collectives in one order on every rank.
    """

    @staticmethod
    def forward(ctx, h_final_BjGRPN, decay_BjGR, layout: CPLayout):
        # decay rides along with the states: one all-gather, not two.
        packed_BjGRX = torch.cat(
            [h_final_BjGRPN.flatten(-2), decay_BjGR[..., None]], dim=-1
        )
        packed_WBjGRX = all_gather_no_grad(packed_BjGRX, layout)
        ctx.layout, ctx.PN = layout, h_final_BjGRPN.shape[-2:]
        ctx.save_for_backward(packed_WBjGRX)
        h_final_W, decay_W = _unpack(packed_WBjGRX, ctx.PN)
        return _states_entering(h_final_W, decay_W, layout)[layout.rank]

    @staticmethod
    def backward(ctx, dh_in_BjGRPN):
        (packed_WBjGRX,) = ctx.saved_tensors
        layout = ctx.layout
        dh_in_WBjGRPN = all_gather_no_grad(dh_in_BjGRPN, layout)
        with torch.enable_grad():
            packed = packed_WBjGRX.detach().requires_grad_()
            h_in = _states_entering(*_unpack(packed, ctx.PN), layout)
            (dpacked,) = torch.autograd.grad(h_in, packed, dh_in_WBjGRPN)
        dh_final_W, ddecay_W = _unpack(dpacked, ctx.PN)
        return dh_final_W[layout.rank], ddecay_W[layout.rank], None


def _unpack(packed_WBjGRX: torch.Tensor, PN) -> tuple[torch.Tensor, torch.Tensor]:
    h_final = packed_WBjGRX[..., :-1].unflatten(-1, PN)
    return h_final, packed_WBjGRX[..., -1]


class _HaloExchange(torch.autograd.Function):
    """Each local segment's conv halo: the last ``K - 1`` inputs of the segment
    before it (zeros before the row's start), from whichever rank holds it.

    Forward all-gathers the tails; backward all-gathers the halos' gradients and
    each rank takes those of its own tails (a tail is the next segment's halo).
    """

    @staticmethod
    def forward(ctx, tails_BjKX, layout: CPLayout):
        ctx.layout = layout
        tails_WBjKX = all_gather_no_grad(tails_BjKX, layout)
        zeros_BKX = torch.zeros_like(tails_BjKX[:, 0])
        halos = []
        for g in layout.segments:
            if g == 0:
                halos.append(zeros_BKX)
            else:
                w, k = layout.owner(g - 1)
                halos.append(tails_WBjKX[w, :, k])
        return torch.stack(halos, dim=1)

    @staticmethod
    def backward(ctx, dhalos_BjKX):
        layout = ctx.layout
        dhalos_WBjKX = all_gather_no_grad(dhalos_BjKX, layout)
        last = layout.size * layout.n_segments - 1
        dtails = []
        for g in layout.segments:
            if g == last:
                dtails.append(torch.zeros_like(dhalos_BjKX[:, 0]))
            else:
                w, k = layout.owner(g + 1)
                dtails.append(dhalos_WBjKX[w, :, k])
        return torch.stack(dtails, dim=1), None
