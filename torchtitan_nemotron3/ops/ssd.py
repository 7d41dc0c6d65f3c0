"""Mamba2's state-space duality (SSD) scan in plain torch: exact, differentiable, packed-aware.

Per head h the recurrence is, with ``a_t = dt_t * A_h`` (A < 0):

    state_t = exp(a_t) * state_{t-1} + dt_t * x_t ⊗ B_t        (state: P x N)
    y_t     = state_t @ C_t

``ssd_chunked`` evaluates it in chunks of Q tokens (the SSD algorithm): inside a chunk
it is a masked "attention" ``(C Bᵀ ∘ decay) x``; across chunks only the P x N states
travel. It is the CPU path and the reference for the CUDA kernel, so it favours
exactness: everything runs in fp32 (or fp64 if given), and no decay is ever formed as
a difference of cumulative sums (``exp(cs_i - cs_j)`` gives NaN gradients once a
cumsum hits -inf), only as masked sums.

Packed documents: a new document at position t sets ``a_t = -inf``, so
``exp(a_t) = 0`` wipes the carried state and every decay spanning the boundary is
exactly zero: no information crosses it, in the chunk or between chunks.

Initial and final states (``ssd_chunked_with_final_state``, used to cut a long row
into pieces, ``ops/long_rows.py``) follow mamba-ssm's Triton kernel: the initial state
is the state of the document whose ``seq_idx`` is 0, so it reaches the tokens up to
the first document change only if ``seq_idx[:, 0] == 0`` (a row starting at another
id starts a new document, ``a_0 = -inf``); the final state is the state after the
last token, i.e. of the row's last document.

Shape suffixes as in the package docstring (``torchtitan_nemotron3/__init__.py``);
here also S, a source position within a chunk, and Z, a destination chunk.
"""

import torch
import torch.nn.functional as F


def segsum(a_Q: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = a[j+1] + ... + a[i]`` for j <= i, -inf above the diagonal.

    Built by a cumsum over a strictly-lower-masked copy, never by subtraction.
    """
    Q = a_Q.size(-1)
    strict_QQ = torch.tril(
        torch.ones(Q, Q, dtype=torch.bool, device=a_Q.device), diagonal=-1
    )
    a_QQ = a_Q[..., :, None].expand(*a_Q.shape, Q).masked_fill(~strict_QQ, 0.0)
    out_QQ = torch.cumsum(a_QQ, dim=-2)
    causal_QQ = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=a_Q.device))
    return out_QQ.masked_fill(~causal_QQ, float("-inf"))


def document_starts(seq_idx_BL: torch.Tensor) -> torch.Tensor:
    """True where a new document starts (not at position 0, where nothing precedes)."""
    return F.pad(seq_idx_BL[:, 1:] != seq_idx_BL[:, :-1], (1, 0), value=False)


def ssd_chunked(
    x_BLHP: torch.Tensor,
    dt_BLH: torch.Tensor,
    A_H: torch.Tensor,
    B_BLGN: torch.Tensor,
    C_BLGN: torch.Tensor,
    chunk_size: int,
    seq_idx_BL: torch.Tensor | None = None,
    initial_states_BHPN: torch.Tensor | None = None,
) -> torch.Tensor:
    """The SSD scan (without the ``D`` skip), state starting at zero (or at
    ``initial_states``, see the module docstring for its ``seq_idx`` semantics).

    ``dt`` is the final, positive step (softplus and limits already applied).
    Any length works: the tail chunk is zero-padded (``dt = 0`` there, which
    neither adds input nor decays, and comes after every real token).
    """
    y_BLHP, _ = _ssd_chunked(
        x_BLHP,
        dt_BLH,
        A_H,
        B_BLGN,
        C_BLGN,
        chunk_size,
        seq_idx_BL,
        initial_states_BHPN,
        final_state=False,
    )
    return y_BLHP


def ssd_chunked_with_final_state(
    x_BLHP: torch.Tensor,
    dt_BLH: torch.Tensor,
    A_H: torch.Tensor,
    B_BLGN: torch.Tensor,
    C_BLGN: torch.Tensor,
    chunk_size: int,
    seq_idx_BL: torch.Tensor | None = None,
    initial_states_BHPN: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ssd_chunked`` and the state after the last token, ``(B, H, P, N)`` in the
    compute dtype (fp32, or fp64 for fp64 inputs): the torch twin of mamba-ssm's
    ``initial_states`` / ``final_states``, differentiable in both."""
    return _ssd_chunked(
        x_BLHP,
        dt_BLH,
        A_H,
        B_BLGN,
        C_BLGN,
        chunk_size,
        seq_idx_BL,
        initial_states_BHPN,
        final_state=True,
    )


def _starts_after_initial_state(seq_idx_BL: torch.Tensor) -> torch.Tensor:
    """``document_starts``, plus position 0 where the row does not start with document
    0 (mamba-ssm gives the initial state to document 0 only)."""
    return torch.cat(
        [seq_idx_BL[:, :1] != 0, seq_idx_BL[:, 1:] != seq_idx_BL[:, :-1]], 1
    )


def _ssd_chunked(
    x_BLHP,
    dt_BLH,
    A_H,
    B_BLGN,
    C_BLGN,
    chunk_size,
    seq_idx_BL,
    initial_states_BHPN,
    final_state: bool,
):
    # Without initial state or final state this is op for op the original
    # ``ssd_chunked`` (bit-identical results and gradients).
    Bsz, L, H, P = x_BLHP.shape
    G, N = B_BLGN.shape[-2:]
    R = H // G
    compute_dtype = torch.float64 if x_BLHP.dtype == torch.float64 else torch.float32

    x_BLHP, dt_BLH, B_BLGN, C_BLGN = (
        t.to(compute_dtype) for t in (x_BLHP, dt_BLH, B_BLGN, C_BLGN)
    )
    a_BLH = dt_BLH * A_H.to(compute_dtype)
    if seq_idx_BL is not None:
        starts_BL = (
            document_starts(seq_idx_BL)
            if initial_states_BHPN is None
            else _starts_after_initial_state(seq_idx_BL)
        )
        a_BLH = a_BLH.masked_fill(starts_BL[..., None], float("-inf"))
    xdt_BLHP = x_BLHP * dt_BLH[..., None]

    pad = (-L) % chunk_size
    if pad:
        xdt_BLHP = F.pad(xdt_BLHP, (0, 0, 0, 0, 0, pad))
        a_BLH = F.pad(a_BLH, (0, 0, 0, pad))
        B_BLGN = F.pad(B_BLGN, (0, 0, 0, 0, 0, pad))
        C_BLGN = F.pad(C_BLGN, (0, 0, 0, 0, 0, pad))
    nC, Q = (L + pad) // chunk_size, chunk_size

    x_BCQGRP = xdt_BLHP.view(Bsz, nC, Q, G, R, P)
    B_BCQGN = B_BLGN.view(Bsz, nC, Q, G, N)
    C_BCQGN = C_BLGN.view(Bsz, nC, Q, G, N)
    a_BGRCQ = a_BLH.view(Bsz, nC, Q, G, R).permute(0, 3, 4, 1, 2)

    # decay_BGRCQS[i, s] = exp(a[s+1] + ... + a[i]): how much of token s reaches token i.
    decay_BGRCQS = torch.exp(segsum(a_BGRCQ))

    # 1. Within each chunk: a causal, decayed "attention" (C_i . B_s) x_s.
    scores_BGCQS = torch.einsum("bcqgn,bcsgn->bgcqs", C_BCQGN, B_BCQGN)
    y_diag_BCQGRP = torch.einsum(
        "bgcqs,bgrcqs,bcsgrp->bcqgrp", scores_BGCQS, decay_BGRCQS, x_BCQGRP
    )

    # 2. The state each chunk leaves behind (its tokens decayed to the chunk end).
    decay_to_end_BGRCQ = decay_BGRCQS[..., -1, :]
    chunk_states_BCGRPN = torch.einsum(
        "bcqgn,bgrcq,bcqgrp->bcgrpn", B_BCQGN, decay_to_end_BGRCQ, x_BCQGRP
    )

    # 3. Carry states across chunks: state entering chunk z is the sum over earlier
    #    chunks of their end state, decayed through the chunks in between.
    #    Source "chunk" 0 is the state before the first chunk (zero or the initial
    #    state); destination nC, dropped unless asked for, is the final state.
    chunk_a_BGRC = a_BGRCQ.sum(dim=-1)
    all_decay_BGRZC = torch.exp(segsum(F.pad(chunk_a_BGRC, (1, 0))))
    chunk_decay_BGRZC = all_decay_BGRZC[..., :-1, :]
    if initial_states_BHPN is None:
        chunk_states_BCGRPN = F.pad(chunk_states_BCGRPN, (0, 0, 0, 0, 0, 0, 0, 0, 1, 0))
    else:
        init_B1GRPN = initial_states_BHPN.to(compute_dtype).reshape(Bsz, 1, G, R, P, N)
        chunk_states_BCGRPN = torch.cat([init_B1GRPN, chunk_states_BCGRPN], dim=1)
    start_states_BZGRPN = torch.einsum(
        "bgrzc,bcgrpn->bzgrpn", chunk_decay_BGRZC, chunk_states_BCGRPN
    )
    final_BHPN = None
    if final_state:
        final_BHPN = torch.einsum(
            "bgrc,bcgrpn->bgrpn", all_decay_BGRZC[..., -1, :], chunk_states_BCGRPN
        ).reshape(Bsz, H, P, N)

    # 4. What each token reads from the state its chunk started with.
    decay_from_start_BGRCQ = torch.exp(torch.cumsum(a_BGRCQ, dim=-1))
    y_off_BCQGRP = torch.einsum(
        "bcqgn,bcgrpn,bgrcq->bcqgrp", C_BCQGN, start_states_BZGRPN, decay_from_start_BGRCQ
    )

    y_BLHP = (y_diag_BCQGRP + y_off_BCQGRP).reshape(Bsz, nC * Q, H, P)
    return y_BLHP[:, :L], final_BHPN


def ssd_scan(
    x_BLHP: torch.Tensor,
    dt_BLH: torch.Tensor,
    A_H: torch.Tensor,
    B_BLGN: torch.Tensor,
    C_BLGN: torch.Tensor,
    chunk_size: int,
    *,
    D_H: torch.Tensor | None,
    dt_bias_H: torch.Tensor | None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    seq_idx_BL: torch.Tensor | None = None,
    initial_states_BHPN: torch.Tensor | None = None,
    final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the mixer's scan (and mamba-ssm's combined kernel) computes from the raw
    ``dt``: ``softplus(dt + dt_bias)`` clamped to ``dt_limit``, the SSD, the ``D``
    skip; output in ``x``'s dtype, and the final state (or None)."""
    compute_dtype = torch.float64 if x_BLHP.dtype == torch.float64 else torch.float32
    dt_BLH = dt_BLH.to(compute_dtype)
    if dt_bias_H is not None:
        dt_BLH = dt_BLH + dt_bias_H.to(compute_dtype)
    if dt_softplus:
        dt_BLH = F.softplus(dt_BLH)
    lo, hi = dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt_BLH = dt_BLH.clamp(min=lo, max=hi)
    args = (x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, chunk_size, seq_idx_BL, initial_states_BHPN)
    if final_state:
        y_BLHP, final_BHPN = ssd_chunked_with_final_state(*args)
    else:
        y_BLHP, final_BHPN = ssd_chunked(*args), None
    if D_H is not None:
        y_BLHP = y_BLHP + D_H.to(compute_dtype)[:, None] * x_BLHP.to(compute_dtype)
    return y_BLHP.to(x_BLHP.dtype), final_BHPN


def ssd_sequential(
    x_BLHP: torch.Tensor,
    dt_BLH: torch.Tensor,
    A_H: torch.Tensor,
    B_BLGN: torch.Tensor,
    C_BLGN: torch.Tensor,
    seq_idx_BL: torch.Tensor | None = None,
    initial_states_BHPN: torch.Tensor | None = None,
) -> torch.Tensor:
    """The recurrence token by token: slow, obviously right; the tests' ground truth."""
    return ssd_sequential_with_final_state(
        x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, seq_idx_BL, initial_states_BHPN
    )[0]


def ssd_sequential_with_final_state(
    x_BLHP: torch.Tensor,
    dt_BLH: torch.Tensor,
    A_H: torch.Tensor,
    B_BLGN: torch.Tensor,
    C_BLGN: torch.Tensor,
    seq_idx_BL: torch.Tensor | None = None,
    initial_states_BHPN: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ssd_sequential`` and the state after the last token (ground truth for
    ``ssd_chunked_with_final_state``)."""
    Bsz, L, H, P = x_BLHP.shape
    R = H // B_BLGN.size(2)
    B_BLHN = B_BLGN.repeat_interleave(R, dim=2)
    C_BLHN = C_BLGN.repeat_interleave(R, dim=2)
    if initial_states_BHPN is None:
        state_BHPN = x_BLHP.new_zeros(Bsz, H, P, B_BLGN.size(-1))
        starts_BL = document_starts(seq_idx_BL) if seq_idx_BL is not None else None
    else:
        state_BHPN = initial_states_BHPN.to(x_BLHP.dtype)
        starts_BL = (
            _starts_after_initial_state(seq_idx_BL) if seq_idx_BL is not None else None
        )
    ys = []
    for t in range(L):
        decay_BH = torch.exp(dt_BLH[:, t] * A_H)
        if starts_BL is not None:
            decay_BH = torch.where(starts_BL[:, t, None], 0.0, decay_BH)
        inp_BHPN = (dt_BLH[:, t, :, None] * x_BLHP[:, t])[..., None] * B_BLHN[:, t, :, None]
        state_BHPN = decay_BH[..., None, None] * state_BHPN + inp_BHPN
        ys.append(torch.einsum("bhpn,bhn->bhp", state_BHPN, C_BLHN[:, t]))
    return torch.stack(ys, dim=1), state_BHPN
