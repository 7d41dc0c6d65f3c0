"""Long rows on the SSD kernel: calls past its 32-bit offsets, cut into pieces that fit.

mamba-ssm's Triton SSD computes element offsets in 32 bits (mamba issue #1015): a
call whose tensors pass 2^31 elements is wrong or crashes. Nano trains at 256K-1M
tokens a row, exactly there. Instead of leaving such calls to the slow torch ops,
this module cuts them into pieces each kernel call can take, exactly:

* **Along the sequence** at multiples of ``chunk_size``: each piece starts from
  the state the previous one ended with (the kernel's ``initial_states`` /
  ``final_states``); the backward runs the pieces right to left, the gradient of a
  piece's initial state (``dinitial_states``) becoming the previous piece's
  ``dfinal_states``. Chunks are the kernel's own unit and the state crosses a cut in
  fp32 (``final_states``), as it crosses a chunk boundary inside one call: under the
  Triton interpreter the cut kernel matches the uncut call bit for bit in fp32
  (``tests/kernels/test_long_rows.py``). One difference in bf16: the kernel returns
  ``dinitial_states`` in ``x``'s dtype, so the running state gradient is rounded to
  bf16 once per cut (inside one call it stays fp32; only the per-chunk copies stored
  for the other kernels are bf16).
* **Along the batch**, trivially: rows are independent.

The conv needs none of this: a conv call too large for causal-conv1d's 32-bit
offsets goes to fla-core's Triton conv (``fla_conv.py``), which splits itself
over documents and takes a single document of up to 4M tokens (65535 chunks of 64).

Packed documents and the kernel's ``initial_states``. In mamba-ssm 2.3.2
(``ssd_state_passing.py``, ``ssd_chunk_scan.py``), the initial state belongs to the
document with ``seq_idx == 0``: state passing starts with ``seq_idx = 0`` and drops
the carried state (scale 0) at the end of chunk 0 unless ``seq_idx`` there is 0; the
chunk scan reads the previous state for chunk 0 with ``seq_idx_prev = 0`` (a masked
load, ``other=0``) and gives it only to tokens whose ``seq_idx`` equals it; the
backward's ``dinitial_states`` uses the same test. A piece's ``seq_idx`` is therefore
renumbered (``piece_seq_idx``): 0 for the document that was running before the cut,
1, 2, ... for each document starting in the piece, including one starting exactly
at the cut. So a document continuing over the cut carries its state, one starting at
the cut does not (the kernel zeroes it), with no tensor surgery on the states.

Pieces are given as two lists of bounds, ``row_bounds`` ([0, ..., B]) and
``seq_bounds`` ([0, ..., L]), every row group cut at the same ``seq_bounds``;
``ssd_plan`` chooses them from the element counts of ``kernel_ops.ssd_ineligible``
(the fewest pieces, balanced). Plain ints, so they can travel as ``int[]``
arguments of custom ops and the backward cuts exactly as the forward did.

The kernel enters as *piece* callables with one contract for any backend:
``piece_fwd(x, dt, A, B, C, D, dt_bias, seq_idx, initial_states) -> (out,
final_states)`` and ``piece_bwd(dout, dfinal_states, x, dt, A, B, C, D, dt_bias,
seq_idx, initial_states, out) -> (dx, ddt, dA, dB, dC, dD, ddt_bias,
dinitial_states)`` (``initial_states``/``dfinal_states`` may be ``None``, meaning
zero). ``mamba_ssm_piece`` builds them from mamba-ssm's
``_mamba_chunk_scan_combined_fwd/_bwd``; ``torch_ssd_piece`` from the exact torch SSD.

``ssd_fwd_pieces``/``ssd_bwd_pieces`` are the raw drivers (to call inside custom
ops: the forward returns the states it carried across the cuts, for the backward);
``ssd_long_rows`` wraps them in an ``autograd.Function``.
"""

import math
from collections.abc import Callable
from itertools import pairwise

import torch

from .ssd import ssd_scan

# Past this many elements the kernels' 32-bit offsets wrap (kernel_ops._OFFSET_LIMIT).
OFFSET_LIMIT = 2**31


# ---------------------------------------------------------------------------------------
# Element counts and plans
# ---------------------------------------------------------------------------------------


def _last_offset(shape, stride) -> int:
    """Element offset of the last element from the first (kernel_ops._last_offset)."""
    return sum((size - 1) * st for size, st in zip(shape, stride))


def ssd_elements(
    rows: int,
    length: int,
    x_BLHP: torch.Tensor,
    dt_BLH: torch.Tensor,
    B_BLGN: torch.Tensor,
    C_BLGN: torch.Tensor,
    chunk_size: int,
) -> int:
    """The largest element count ``kernel_ops.ssd_ineligible`` sees for an SSD call on
    ``rows`` rows and ``length`` tokens of these tensors (views keep their strides)."""
    _, _, H, P = x_BLHP.shape
    G, N = B_BLGN.shape[-2:]
    n_chunks = math.ceil(length / chunk_size)
    return max(
        *(
            _last_offset((rows, length, *t.shape[2:]), t.stride())
            for t in (x_BLHP, dt_BLH, B_BLGN, C_BLGN)
        ),
        rows * length * H * P,  # out, dx, dout
        rows * n_chunks * H * P * N,  # chunk states
        rows * n_chunks * G * chunk_size * chunk_size,  # C·Bᵀ per chunk
    )


def split_points(
    length: int,
    multiple: int,
    max_elements: int,
    elements: Callable[[int], int],
) -> list[int]:
    """Bounds ``[0, s_1, ..., length]`` cutting ``length`` into the fewest balanced
    pieces with ``elements(piece) < max_elements``, every piece but the last a
    multiple of ``multiple`` (``chunk_size`` for the SSD). ``elements`` must grow
    with the piece length. Raises ``ValueError`` if not even ``multiple`` fits."""
    if elements(length) < max_elements:
        return [0, length]
    if elements(multiple) >= max_elements:
        raise ValueError(
            f"no piece of {multiple} tokens fits under {max_elements} elements "
            f"({elements(multiple)})"
        )
    units = math.ceil(length / multiple)
    lo, hi = 1, units  # elements(lo * multiple) fits, elements(hi * multiple) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if elements(mid * multiple) < max_elements:
            lo = mid
        else:
            hi = mid
    n_pieces = math.ceil(units / lo)
    step = math.ceil(units / n_pieces) * multiple
    return [*range(0, length, step), length]


def _plan(
    batch: int, length: int, multiple: int, max_elements: int, elements
) -> tuple[list[int], list[int]]:
    """``elements(rows, length, cut)``: the count for a piece, ``cut`` if the piece
    may start inside a row."""
    whole = [0, length]
    if elements(batch, length, False) < max_elements:
        return [0, batch], whole
    if elements(1, length, False) < max_elements:  # whole rows fit: cut the batch
        rows = split_points(
            batch, 1, max_elements, lambda r: elements(r, length, False)
        )
        return rows, whole
    cuts = split_points(length, multiple, max_elements, lambda n: elements(1, n, True))
    return list(range(batch + 1)), cuts


def ssd_plan(
    x_BLHP: torch.Tensor,
    dt_BLH: torch.Tensor,
    B_BLGN: torch.Tensor,
    C_BLGN: torch.Tensor,
    chunk_size: int,
    max_elements: int = OFFSET_LIMIT,
) -> tuple[list[int], list[int]]:
    """``(row_bounds, seq_bounds)`` for an SSD call: one piece if it fits; else groups
    of whole rows if a row fits; else single rows cut along the sequence at
    multiples of ``chunk_size``. Uses only shapes and strides (meta tensors work)."""
    Bsz, L = x_BLHP.shape[:2]
    return _plan(
        Bsz,
        L,
        chunk_size,
        max_elements,
        lambda r, n, _: ssd_elements(r, n, x_BLHP, dt_BLH, B_BLGN, C_BLGN, chunk_size),
    )


def piece_seq_idx(seq_idx_BL: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """``seq_idx`` of tokens ``[start, end)`` renumbered for a kernel call whose
    ``initial_states`` is the state after token ``start - 1``: 0 for the document
    running at ``start - 1`` (if it continues), then 1, 2, ... at each document start
    (adjacent ids differing), one at ``start`` included. int32, contiguous."""
    piece_BL = seq_idx_BL[:, start:end]
    before_BL = seq_idx_BL[:, start - 1 : start] if start > 0 else piece_BL[:, :1]
    starts_BL = piece_BL != torch.cat([before_BL, piece_BL[:, :-1]], dim=1)
    return torch.cumsum(starts_BL, dim=1, dtype=torch.int32)


# ---------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------


def mamba_ssm_piece(
    fwd: Callable,
    bwd: Callable,
    chunk_size: int,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> tuple[Callable, Callable]:
    """``(piece_fwd, piece_bwd)`` on mamba-ssm's ``_mamba_chunk_scan_combined_fwd`` /
    ``_bwd`` (or anything with their signatures, e.g. ``loader.SSDKernels``)."""

    def piece_fwd(x, dt, A, B, C, D, dt_bias, seq_idx, initial_states):
        out, _out_x, _dt, _dA_cumsum, _states, final_states = fwd(
            x,
            dt,
            A,
            B,
            C,
            chunk_size,
            D=D,
            dt_bias=dt_bias,
            initial_states=initial_states,
            seq_idx=seq_idx,
            dt_softplus=dt_softplus,
            dt_limit=dt_limit,
        )
        return out, final_states

    def piece_bwd(
        dout, dfinal_states, x, dt, A, B, C, D, dt_bias, seq_idx, initial_states, out
    ):
        dx, ddt, dA, dB, dC, dD, _dz, ddt_bias, dinitial_states = bwd(
            dout,
            x,
            dt,
            A,
            B,
            C,
            out,
            chunk_size,
            D=D,
            dt_bias=dt_bias,
            initial_states=initial_states,
            dfinal_states=dfinal_states,
            seq_idx=seq_idx,
            dt_softplus=dt_softplus,
            dt_limit=dt_limit,
        )
        return dx, ddt, dA, dB, dC, dD, ddt_bias, dinitial_states

    return piece_fwd, piece_bwd


def _torch_ssd(
    x, dt, A, B, C, D, dt_bias, seq_idx, initial_states, chunk_size, dt_softplus, dt_limit
):
    return ssd_scan(
        x, dt, A, B, C, chunk_size, D_H=D, dt_bias_H=dt_bias, dt_softplus=dt_softplus,
        dt_limit=dt_limit, seq_idx_BL=seq_idx, initial_states_BHPN=initial_states,
        final_state=True,
    )  # fmt: skip


def torch_ssd_piece(
    chunk_size: int,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> tuple[Callable, Callable]:
    """``(piece_fwd, piece_bwd)`` on the exact torch SSD (``ssd.ssd_scan``)
    with mamba-ssm's semantics (``seq_idx``, ``initial_states``, fp32 final states);
    the backward recomputes the forward under autograd. For CPU tests: inside a
    custom op's implementation autograd is off, so do not call it there."""

    def piece_fwd(x, dt, A, B, C, D, dt_bias, seq_idx, initial_states):
        with torch.no_grad():
            return _torch_ssd(
                x,
                dt,
                A,
                B,
                C,
                D,
                dt_bias,
                seq_idx,
                initial_states,
                chunk_size,
                dt_softplus,
                dt_limit,
            )

    def piece_bwd(
        dout, dfinal_states, x, dt, A, B, C, D, dt_bias, seq_idx, initial_states, out
    ):
        inputs = (x, dt, A, B, C, D, dt_bias, initial_states)
        leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
        with torch.enable_grad():
            y, final = _torch_ssd(
                *leaves[:7], seq_idx, leaves[7], chunk_size, dt_softplus, dt_limit
            )
            outputs, grads = [y], [dout]
            if dfinal_states is not None:
                outputs.append(final)
                grads.append(dfinal_states.to(final.dtype))
            wrt = [t for t in leaves if t is not None]
            found = iter(torch.autograd.grad(outputs, wrt, grads, allow_unused=True))
        result = [None if t is None else next(found) for t in leaves]
        return tuple(
            None if t is None else (torch.zeros_like(t) if g is None else g)
            for t, g in zip(leaves, result)
        )

    return piece_fwd, piece_bwd


# ---------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------


def _state_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _Sum:
    """Sum of per-piece gradients of a parameter, accumulated in fp32 (fp64 if given)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None

    def add(self, g: torch.Tensor | None) -> None:
        if g is None:
            return
        self.dtype = g.dtype
        acc = g.to(torch.float64 if g.dtype == torch.float64 else torch.float32)
        self.total = acc if self.total is None else self.total + acc

    def result(self) -> torch.Tensor | None:
        return None if self.total is None else self.total.to(self.dtype)


def _into(
    buffer: torch.Tensor | None, like_shape, piece: torch.Tensor, index
) -> torch.Tensor:
    """Copy ``piece`` into ``buffer[index]``, allocating ``buffer`` (full shape, the
    piece's dtype, contiguous) on first use; a piece that is the whole (a call that
    was not cut) is returned as is, without a copy."""
    if buffer is None:
        if piece.shape == like_shape:
            return piece
        buffer = piece.new_empty(like_shape)
    buffer[index].copy_(piece)
    return buffer


def _seq_pieces(seq_idx_BL, seq_bounds):
    """Per sequence piece: (start, end, that piece's seq_idx or None) for all rows."""
    n = len(seq_bounds) - 1
    for s, e in pairwise(seq_bounds):
        if seq_idx_BL is None:
            yield s, e, None
        elif n == 1:
            yield s, e, seq_idx_BL
        else:
            yield s, e, piece_seq_idx(seq_idx_BL, s, e)


def ssd_fwd_pieces(
    piece_fwd: Callable,
    x_BLHP: torch.Tensor,
    dt_BLH: torch.Tensor,
    A_H: torch.Tensor,
    B_BLGN: torch.Tensor,
    C_BLGN: torch.Tensor,
    D_H: torch.Tensor | None,
    dt_bias_H: torch.Tensor | None,
    seq_idx_BL: torch.Tensor | None,
    *,
    row_bounds: list[int],
    seq_bounds: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD over pieces, left to right, carrying the state across each cut.

    Returns ``out`` (B, L, H, P), in the dtype ``piece_fwd`` returns, and ``carried``
    (n_seq_pieces - 1, B, H, P, N) fp32 (fp64 for fp64 ``x``): ``carried[k]`` is the
    state entering sequence piece k + 1, which ``ssd_bwd_pieces`` needs."""
    Bsz, _, H, P = x_BLHP.shape
    N = B_BLGN.shape[-1]
    carried = x_BLHP.new_empty(
        (len(seq_bounds) - 2, Bsz, H, P, N), dtype=_state_dtype(x_BLHP)
    )
    pieces = list(_seq_pieces(seq_idx_BL, seq_bounds))
    out = None
    for r0, r1 in pairwise(row_bounds):
        rows = slice(r0, r1)
        state = None
        for k, (s, e, seq_BL) in enumerate(pieces):
            at = (rows, slice(s, e))
            y, final = piece_fwd(
                x_BLHP[at],
                dt_BLH[at],
                A_H,
                B_BLGN[at],
                C_BLGN[at],
                D_H,
                dt_bias_H,
                None if seq_BL is None else seq_BL[rows],
                state,
            )
            out = _into(out, x_BLHP.shape, y, at)
            if k < len(pieces) - 1:
                carried[k, rows].copy_(final)
                state = carried[k, rows]
    return out, carried


def ssd_bwd_pieces(
    piece_bwd: Callable,
    dout_BLHP: torch.Tensor,
    x_BLHP: torch.Tensor,
    dt_BLH: torch.Tensor,
    A_H: torch.Tensor,
    B_BLGN: torch.Tensor,
    C_BLGN: torch.Tensor,
    D_H: torch.Tensor | None,
    dt_bias_H: torch.Tensor | None,
    seq_idx_BL: torch.Tensor | None,
    out_BLHP: torch.Tensor,
    carried: torch.Tensor,
    *,
    row_bounds: list[int],
    seq_bounds: list[int],
) -> tuple[torch.Tensor, ...]:
    """Gradients ``(dx, ddt, dA, dB, dC, dD, ddt_bias)`` of the SSD over pieces: right to
    left, each piece's ``dinitial_states`` the ``dfinal_states`` of the piece before.
    ``dx, ddt, dB, dC`` are full (B, L, ...) tensors in the dtypes ``piece_bwd`` returns;
    ``dA, dD, ddt_bias`` are summed over pieces in fp32 and returned in its dtypes
    (``None`` where ``D``/``dt_bias`` are). Same bounds as the forward."""
    if carried.shape[0] != len(seq_bounds) - 2:
        raise ValueError(
            f"{carried.shape[0]} carried states for {len(seq_bounds) - 1} sequence pieces"
        )
    pieces = list(_seq_pieces(seq_idx_BL, seq_bounds))
    dx = ddt = dB = dC = None
    dA, dD, ddt_bias = _Sum(), _Sum(), _Sum()
    for r0, r1 in pairwise(row_bounds):
        rows = slice(r0, r1)
        dfinal = None
        for k in reversed(range(len(pieces))):
            s, e, seq_BL = pieces[k]
            at = (rows, slice(s, e))
            g = piece_bwd(
                dout_BLHP[at],
                dfinal,
                x_BLHP[at],
                dt_BLH[at],
                A_H,
                B_BLGN[at],
                C_BLGN[at],
                D_H,
                dt_bias_H,
                None if seq_BL is None else seq_BL[rows],
                carried[k - 1, rows] if k > 0 else None,
                out_BLHP[at],
            )
            dx = _into(dx, x_BLHP.shape, g[0], at)
            ddt = _into(ddt, dt_BLH.shape, g[1], at)
            dB = _into(dB, B_BLGN.shape, g[3], at)
            dC = _into(dC, C_BLGN.shape, g[4], at)
            dA.add(g[2])
            dD.add(g[5])
            ddt_bias.add(g[6])
            dfinal = g[7]
    return dx, ddt, dA.result(), dB, dC, dD.result(), ddt_bias.result()


# ---------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------


class _LongRowSSD(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, pieces, row_bounds, seq_bounds, x, dt, A, B, C, D, dt_bias, seq_idx
    ):
        bounds = {"row_bounds": row_bounds, "seq_bounds": seq_bounds}
        out, carried = ssd_fwd_pieces(
            pieces[0], x, dt, A, B, C, D, dt_bias, seq_idx, **bounds
        )
        ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, seq_idx, out, carried)
        ctx.piece_bwd, ctx.bounds = pieces[1], bounds
        return out

    @staticmethod
    def backward(ctx, dout):
        x, dt, A, B, C, D, dt_bias, seq_idx, out, carried = ctx.saved_tensors
        grads = ssd_bwd_pieces(
            ctx.piece_bwd,
            dout,
            x,
            dt,
            A,
            B,
            C,
            D,
            dt_bias,
            seq_idx,
            out,
            carried,
            **ctx.bounds,
        )
        like = (x, dt, A, B, C, D, dt_bias)
        grads = [None if g is None else g.to(t.dtype) for g, t in zip(grads, like)]
        return (None, None, None, *grads, None)


def ssd_long_rows(
    piece_fwd: Callable,
    piece_bwd: Callable,
    x_BLHP: torch.Tensor,
    dt_BLH: torch.Tensor,
    A_H: torch.Tensor,
    B_BLGN: torch.Tensor,
    C_BLGN: torch.Tensor,
    D_H: torch.Tensor | None,
    dt_bias_H: torch.Tensor | None,
    seq_idx_BL: torch.Tensor | None,
    *,
    row_bounds: list[int],
    seq_bounds: list[int],
) -> torch.Tensor:
    """The SSD over pieces, differentiable in x, dt, A, B, C, D, dt_bias (eager use,
    and the tests; compiled code wants ``ssd_fwd_pieces``/``ssd_bwd_pieces`` inside
    custom ops)."""
    return _LongRowSSD.apply(
        (piece_fwd, piece_bwd),
        list(row_bounds),
        list(seq_bounds),
        x_BLHP,
        dt_BLH,
        A_H,
        B_BLGN,
        C_BLGN,
        D_H,
        dt_bias_H,
        seq_idx_BL,
    )


