"""``ops/long_rows.py``: long rows cut into pieces under the kernels' 32-bit offset limit.

On CPU with an artificially low limit, the pieces run on the exact torch SSD
(``torch_ssd_piece``) and must reproduce the unsplit op, forward
and every input gradient, with packed documents crossing the cuts. If mamba-ssm and
Triton are importable, a subprocess runs mamba-ssm's own Triton SSD under
``TRITON_INTERPRET=1`` to pin the ``seq_idx`` + ``initial_states`` semantics the
renumbering relies on, and the cut kernel against the uncut kernel.
"""

import importlib.util
import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from torchtitan_nemotron3.ops import kernel_ops, long_rows
from torchtitan_nemotron3.ops.fla_conv import fla_conv_ineligible
from torchtitan_nemotron3.ops.long_rows import (
    piece_seq_idx,
    split_points,
    ssd_elements,
    ssd_long_rows,
    ssd_plan,
    torch_ssd_piece,
)
from torchtitan_nemotron3.ops.ssd import (
    ssd_chunked,
    ssd_chunked_with_final_state,
    ssd_sequential_with_final_state,
)
from torchtitan_nemotron3.ops.torch_ops import TorchMambaOps

H, P, G, N, Q = 4, 4, 2, 4, 8
L = 45  # cut at 16 and 32: the last piece (13 tokens) is no multiple of the chunk


def _seq_idx(rows_starts: list[list[int]], length: int) -> torch.Tensor:
    starts = torch.zeros(len(rows_starts), length, dtype=torch.int32)
    for row, positions in enumerate(rows_starts):
        starts[row, positions] = 1
    return torch.cumsum(starts, dim=1, dtype=torch.int32)


# Row 0: [15] a 1-token document just before the cut at 16, a document starting at
# the cut 16, one running over the cut at 32, a 1-token document at the end.
# Row 1: a document over the cut at 16, [31] and [32] 1-token documents on both sides
# of the cut at 32 (the second starting exactly at it).
PACKED = _seq_idx([[5, 15, 16, 20, 40, 44], [7, 31, 32, 33]], L)


def _ssd_inputs(Bsz=2, length=L, seed=0, dtype=torch.float32, params=True):
    """Scan inputs laid out as the mixer makes them: x, B, C slices of the conv output,
    dt a slice of the in_proj output (strided views)."""
    g = torch.Generator().manual_seed(seed)
    xBC = torch.randn(Bsz, length, H * P + 2 * G * N, generator=g, dtype=dtype)
    proj = torch.randn(Bsz, length, 8 + H, generator=g, dtype=dtype)
    x, B, C = xBC.split([H * P, G * N, G * N], dim=-1)
    return {
        "x": x.unflatten(-1, (H, P)),
        "dt": proj[..., 8:],
        "A": -torch.rand(H, generator=g, dtype=dtype) * 2 - 0.5,
        "B": B.unflatten(-1, (G, N)),
        "C": C.unflatten(-1, (G, N)),
        "D": torch.randn(H, generator=g, dtype=dtype) if params else None,
        "dt_bias": (torch.randn(H, generator=g, dtype=dtype) * 0.5 - 1)
        if params
        else None,
    }


def _leaves(inputs: dict) -> dict:
    return {
        k: None if v is None else v.detach().clone().requires_grad_()
        for k, v in inputs.items()
    }


def _grads(out: torch.Tensor, leaves: dict, seed: int = 1) -> dict:
    dout = torch.randn(
        out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype
    )
    wrt = {k: v for k, v in leaves.items() if v is not None}
    return dict(zip(wrt, torch.autograd.grad(out, list(wrt.values()), dout)))


def _unsplit_ssd(inputs, seq_idx, dt_limit):
    leaves = _leaves(inputs)
    zero = torch.zeros(H, dtype=inputs["x"].dtype)
    out = TorchMambaOps().scan(
        leaves["x"],
        leaves["dt"],
        leaves["A"],
        leaves["B"],
        leaves["C"],
        D_H=zero if leaves["D"] is None else leaves["D"],
        dt_bias_H=zero if leaves["dt_bias"] is None else leaves["dt_bias"],
        dt_limit=dt_limit,
        chunk_size=Q,
        seq_idx_BL=seq_idx,
    )
    return out, _grads(out, leaves)


def _split_ssd(inputs, seq_idx, dt_limit, row_bounds, seq_bounds):
    leaves = _leaves(inputs)
    out = ssd_long_rows(
        *torch_ssd_piece(Q, dt_softplus=True, dt_limit=dt_limit),
        leaves["x"],
        leaves["dt"],
        leaves["A"],
        leaves["B"],
        leaves["C"],
        leaves["D"],
        leaves["dt_bias"],
        seq_idx,
        row_bounds=row_bounds,
        seq_bounds=seq_bounds,
    )
    return out, _grads(out, leaves)


def _max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# --- plans ---------------------------------------------------------------------------


def test_split_points():
    def per_token(n):
        return 10 * n

    assert split_points(45, 8, 1000, per_token) == [0, 45]  # fits: one piece
    # at most 16 tokens (2 chunks) a piece: 3 pieces, the last one 13 tokens
    assert split_points(45, 8, 170, per_token) == [0, 16, 32, 45]
    # at most 3 chunks: 2 balanced pieces of 3 chunks, not 3 + 3 + 0
    assert split_points(45, 8, 250, per_token) == [0, 24, 45]
    # at most 5 chunks: 2 pieces of 3 chunks rather than 5 + 1
    assert split_points(48, 8, 410, per_token) == [0, 24, 48]
    assert split_points(7, 1, 30, per_token) == [0, 2, 4, 6, 7]
    with pytest.raises(ValueError, match="no piece of 8 tokens"):
        split_points(45, 8, 80, per_token)


def test_low_limit_plans():
    inputs = _ssd_inputs()
    tensors = (inputs["x"], inputs["dt"], inputs["B"], inputs["C"])
    one_row = ssd_elements(1, L, *tensors, Q)
    assert ssd_plan(*tensors, Q) == ([0, 2], [0, L])
    assert ssd_plan(*tensors, Q, max_elements=one_row + 1) == ([0, 1, 2], [0, L])
    two_chunks = ssd_elements(1, 16, *tensors, Q)
    assert ssd_plan(*tensors, Q, max_elements=two_chunks + 1) == (
        [0, 1, 2],
        [0, 16, 32, L],
    )


@pytest.mark.parametrize("batch", [1, 2])
def test_nano_1m_plan_is_what_kernel_ops_accepts(batch):
    """Nano's mixer layout at 1M tokens a row (meta tensors: shapes and strides only):
    the full call is past the limit; every planned piece passes
    ``kernel_ops.ssd_ineligible``, and one more chunk would not. The conv call, past
    causal-conv1d's limit, is fla-core's (which splits it: ``test_fla_conv.py``)."""
    Lr, Hn, Pn, Gn, Nn, Qn, K = 2**20, 64, 64, 8, 128, 128, 4
    d_inner, GN = Hn * Pn, Gn * Nn
    conv_dim = d_inner + 2 * GN
    proj = torch.empty(
        batch, Lr, d_inner + conv_dim + Hn, device="meta", dtype=torch.bfloat16
    )
    _z, xBC, dt = proj.split([d_inner, conv_dim, Hn], dim=-1)
    conv_out = torch.empty(batch, Lr, conv_dim, device="meta", dtype=torch.bfloat16)
    x, B, C = (t for t in conv_out.split([d_inner, GN, GN], dim=-1))
    x, B, C = (
        x.unflatten(-1, (Hn, Pn)),
        B.unflatten(-1, (Gn, Nn)),
        C.unflatten(-1, (Gn, Nn)),
    )

    assert kernel_ops.ssd_ineligible(x, dt, B, C, Qn)
    rows, seqs = ssd_plan(x, dt, B, C, Qn)
    assert rows == list(range(batch + 1))
    pieces = list(itertools.pairwise(seqs))
    assert all(s % Qn == 0 for s in seqs[:-1])
    for s, e in pieces:
        at = (slice(0, 1), slice(s, e))
        assert kernel_ops.ssd_ineligible(x[at], dt[at], B[at], C[at], Qn) == ""
    # fewest pieces: ceil(L / the longest piece kernel_ops accepts)
    fit = max(e - s for s, e in pieces)
    while not kernel_ops.ssd_ineligible(
        *(t[:1, : fit + Qn] for t in (x, dt, B, C)), Qn
    ):
        fit += Qn
    assert len(pieces) == -(-Lr // fit)
    # dt, a slice of the in_proj output (row stride 10304), binds: ~208K tokens a piece
    assert len(pieces) == 6, seqs

    weight = torch.empty(conv_dim, K, device="meta", dtype=torch.bfloat16)
    assert kernel_ops.conv_ineligible(xBC, weight)
    assert fla_conv_ineligible(xBC, weight) == ""


def test_piece_seq_idx():
    seq = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3], [4, 4, 5, 5, 5, 5, 6, 7]])
    # cut at 3: row 0 starts a document exactly there (-> 1), row 1 continues one (-> 0)
    assert piece_seq_idx(seq, 3, 8).tolist() == [[1, 1, 2, 3, 3], [0, 0, 0, 1, 2]]
    assert piece_seq_idx(seq, 0, 3).tolist() == [[0, 0, 0], [0, 0, 1]]
    assert piece_seq_idx(seq, 7, 8).tolist() == [[0], [1]]
    assert piece_seq_idx(seq, 3, 8).dtype == torch.int32


# --- the torch SSD as a piece ----------------------------------------------------------


def test_initial_and_final_state_follow_mamba_ssm():
    """The initial state is document 0's: row 0 (seq_idx starting at 0) carries it to
    its first document change, row 1 (starting at 1) drops it; the final state is the
    state after the last token. Against the token-by-token recurrence, fp64."""
    g = torch.Generator().manual_seed(3)
    Bsz, n = 2, 21
    x = torch.randn(Bsz, n, H, P, generator=g, dtype=torch.float64)
    dt = torch.rand(Bsz, n, H, generator=g, dtype=torch.float64)
    A = -torch.rand(H, generator=g, dtype=torch.float64) - 0.5
    B = torch.randn(Bsz, n, G, N, generator=g, dtype=torch.float64)
    C = torch.randn(Bsz, n, G, N, generator=g, dtype=torch.float64)
    init = torch.randn(Bsz, H, P, N, generator=g, dtype=torch.float64)
    seq = torch.tensor([[0] * 12 + [1] * 9, [1] * 5 + [2] * 16], dtype=torch.int32)
    for seq_idx in (None, seq):
        y, final = ssd_chunked_with_final_state(x, dt, A, B, C, Q, seq_idx, init)
        y_ref, final_ref = ssd_sequential_with_final_state(
            x, dt, A, B, C, seq_idx, init
        )
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)
    # row 1 dropped the initial state: as if there were none
    y0 = ssd_chunked(x, dt, A, B, C, Q, seq)
    torch.testing.assert_close(y[1], y0[1], rtol=1e-12, atol=1e-12)
    assert (y[0] - y0[0]).abs().max() > 1e-2
    # and the rows' outputs past row 0's document change do not see it either
    torch.testing.assert_close(y[0, 12:], y0[0, 12:], rtol=1e-12, atol=1e-12)


def test_with_final_state_gradcheck():
    g = torch.Generator().manual_seed(4)
    n = 7
    args = [
        torch.randn(1, n, 2, 2, generator=g, dtype=torch.float64),
        torch.rand(1, n, 2, generator=g, dtype=torch.float64) + 0.1,
        -torch.rand(2, generator=g, dtype=torch.float64) - 0.5,
        torch.randn(1, n, 1, 2, generator=g, dtype=torch.float64),
        torch.randn(1, n, 1, 2, generator=g, dtype=torch.float64),
        torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64),
    ]
    args = [a.requires_grad_() for a in args]
    seq = torch.tensor([[0, 0, 0, 1, 1, 2, 2]], dtype=torch.int32)

    def f(x, dt, A, B, C, init):
        return ssd_chunked_with_final_state(x, dt, A, B, C, 3, seq, init)

    assert torch.autograd.gradcheck(f, args)


# --- the SSD cut into pieces -------------------------------------------------------------

CASES = {
    # name: (seq_idx, plan, params, dt_limit); plan: "seq" (single rows, cut at 16 and
    # 32), "rows" (single rows, whole), "one" (no cut: the call as is)
    "packed-seq": (PACKED, "seq", True, (0.0, float("inf"))),
    "packed-seq-limit": (PACKED, "seq", True, (0.05, 1.5)),
    "plain-seq-no-D": (None, "seq", False, (0.0, float("inf"))),
    "packed-rows": (PACKED, "rows", True, (0.0, float("inf"))),
    "packed-one-piece": (PACKED, "one", True, (0.0, float("inf"))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ssd_pieces_match_unsplit_fp32(case):
    seq_idx, how, params, dt_limit = CASES[case]
    inputs = _ssd_inputs(params=params)
    tensors = (inputs["x"], inputs["dt"], inputs["B"], inputs["C"])
    length = {"seq": 16, "rows": L, "one": 10 * L}[how]
    row_bounds, seq_bounds = ssd_plan(
        *tensors, Q, max_elements=ssd_elements(1, length, *tensors, Q) + 1
    )
    assert len(seq_bounds) == (4 if how == "seq" else 2)
    assert len(row_bounds) == (2 if how == "one" else 3)

    out_ref, grads_ref = _unsplit_ssd(inputs, seq_idx, dt_limit)
    out, grads = _split_ssd(inputs, seq_idx, dt_limit, row_bounds, seq_bounds)
    assert out.dtype == torch.float32
    assert _max_rel_err(out, out_ref) < 2e-6
    assert grads.keys() == {k for k, v in inputs.items() if v is not None}
    for name, g in grads.items():
        assert g.dtype == torch.float32 and g.shape == inputs[name].shape
        assert _max_rel_err(g, grads_ref[name]) < 5e-6, name


def test_ssd_pieces_need_the_renumbering(monkeypatch):
    """Control: handing the kernel the raw seq_idx slices (ids not renumbered) gives
    continuing documents no state and lets new ones inherit it: clearly wrong."""
    inputs = _ssd_inputs()
    out_ref, _ = _unsplit_ssd(inputs, PACKED, (0.0, float("inf")))
    monkeypatch.setattr(
        long_rows, "piece_seq_idx", lambda s, a, b: s[:, a:b].contiguous()
    )
    out, _ = _split_ssd(inputs, PACKED, (0.0, float("inf")), [0, 1, 2], [0, 16, 32, L])
    assert _max_rel_err(out, out_ref) > 1e-2


def test_ssd_pieces_fp64_exact():
    inputs = _ssd_inputs(dtype=torch.float64)
    out_ref, grads_ref = _unsplit_ssd(inputs, PACKED, (0.0, float("inf")))
    out, grads = _split_ssd(
        inputs, PACKED, (0.0, float("inf")), [0, 1, 2], [0, 8, 16, 40, L]
    )
    assert _max_rel_err(out, out_ref) < 1e-13
    for name, g in grads.items():
        assert _max_rel_err(g, grads_ref[name]) < 1e-12, name


# --- mamba-ssm's Triton SSD under the interpreter ----------------------------------------

_INTERPRETED = textwrap.dedent(
    r"""
    import contextlib, json, sys, time, types
    import torch
    import torch.nn.functional as F

    # CPU plumbing for kernels written for CUDA (local to this process).
    torch.cuda.device = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(multi_processor_count=4)
    from torchtitan_nemotron3.ops.loader import import_bypassing_init
    det, _ = import_bypassing_init("mamba_ssm", "utils.determinism")
    det.autotune_configs = lambda configs: [min(configs, key=det._estimate_config_cost)]
    ssd, _ = import_bypassing_init("mamba_ssm", "ops.triton.ssd_combined")
    from torchtitan_nemotron3.ops import long_rows

    t0 = time.time()
    Bsz, L, H, P, G, N, Q = 2, 21, 2, 4, 1, 4, 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(Bsz, L, H, P, generator=g)
    dt = torch.randn(Bsz, L, H, generator=g) - 1
    A = -torch.rand(H, generator=g) - 0.5
    B = torch.randn(Bsz, L, G, N, generator=g)
    C = torch.randn(Bsz, L, G, N, generator=g)
    D = torch.randn(H, generator=g)
    dt_bias = torch.randn(H, generator=g) * 0.3
    init = torch.randn(Bsz, H, P, N, generator=g)
    dout = torch.randn(Bsz, L, H, P, generator=g)
    dfinal = torch.randn(Bsz, H, P, N, generator=g)
    kernel = long_rows.mamba_ssm_piece(ssd._mamba_chunk_scan_combined_fwd, ssd._mamba_chunk_scan_combined_bwd, Q)
    torch_piece = long_rows.torch_ssd_piece(Q)
    res = {}

    def err(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    # 1. Semantics of seq_idx + initial_states: row 0 starts with id 0 (a document
    #    change at 12, inside chunk 1), row 1 with id 1 (then 2 at 5).
    seq = torch.tensor([[0] * 12 + [1] * 9, [1] * 5 + [2] * 16], dtype=torch.int32)
    args = (x, dt, A, B, C, D, dt_bias, seq)
    out_k, fin_k = kernel[0](*args, init)
    out_t, fin_t = torch_piece[0](*args, init)
    out_0, _ = kernel[0](*args, None)
    res["init_fwd_out_err"] = err(out_k, out_t)
    res["init_fwd_final_err"] = err(fin_k, fin_t)
    res["row0_init_changes_doc0"] = (out_k[0, :12] - out_0[0, :12]).abs().max().item()
    res["row0_after_doc0_same"] = (out_k[0, 12:] - out_0[0, 12:]).abs().max().item()
    res["row1_init_ignored"] = (out_k[1] - out_0[1]).abs().max().item()
    g_k = kernel[1](dout, dfinal, *args, init, out_k)
    g_t = torch_piece[1](dout, dfinal, *args, init, out_t)
    names = ["dx", "ddt", "dA", "dB", "dC", "dD", "ddt_bias", "dinitial_states"]
    res["init_bwd_errs"] = {n: err(a, b) for n, a, b in zip(names, g_k, g_t)}
    res["row1_dinitial_zero"] = g_k[7][1].abs().max().item()

    # 2. The cut kernel against the uncut kernel (and the torch op), cuts at 8 and 16:
    #    documents over the cuts, starting exactly at them, 1-token ones at 7, 8, 15, 16, 20.
    starts = torch.zeros(Bsz, L, dtype=torch.int32)
    starts[0, [5, 7, 8, 10, 20]] = 1
    starts[1, [3, 15, 16, 17]] = 1
    seq = torch.cumsum(starts, 1, dtype=torch.int32)
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, dt_bias)]
    y = long_rows.ssd_long_rows(*kernel, *leaves, seq, row_bounds=[0, Bsz], seq_bounds=[0, 8, 16, L])
    grads = torch.autograd.grad(y, leaves, dout)
    y_full, *_ = ssd._mamba_chunk_scan_combined_fwd(x, dt, A, B, C, Q, D=D, dt_bias=dt_bias, seq_idx=seq, dt_softplus=True)
    g_full = ssd._mamba_chunk_scan_combined_bwd(dout, x, dt, A, B, C, y_full, Q, D=D, dt_bias=dt_bias, seq_idx=seq, dt_softplus=True)
    g_full = [g_full[i] for i in (0, 1, 2, 3, 4, 5, 7)]
    y_torch, _ = torch_piece[0](x, dt, A, B, C, D, dt_bias, seq, None)
    res["split_fwd_err"] = err(y, y_full)
    res["split_fwd_err_vs_torch"] = err(y, y_torch)
    res["split_bwd_errs"] = {n: err(a, b) for n, a, b in zip(names, grads, g_full)}
    res["seconds"] = time.time() - t0
    print("RESULT" + json.dumps(res))
    """
)


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or importlib.util.find_spec("mamba_ssm") is None,
    reason="mamba-ssm / Triton not installed",
)
def test_mamba_ssm_kernel_semantics_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETED],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT") :])
    print(json.dumps(res, indent=1))
    # the kernel gives the initial state to document 0 only, and its gradient too
    assert res["init_fwd_out_err"] < 1e-5 and res["init_fwd_final_err"] < 1e-5
    assert res["row0_init_changes_doc0"] > 1e-2
    assert res["row0_after_doc0_same"] < 1e-5 and res["row1_init_ignored"] < 1e-5
    assert res["row1_dinitial_zero"] == 0.0
    assert max(res["init_bwd_errs"].values()) < 1e-4, res["init_bwd_errs"]
    # cut kernel = uncut kernel
    assert res["split_fwd_err"] < 1e-5 and res["split_fwd_err_vs_torch"] < 1e-5
    assert max(res["split_bwd_errs"].values()) < 1e-4, res["split_bwd_errs"]
