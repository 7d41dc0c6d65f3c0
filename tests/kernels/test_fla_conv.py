"""fla-core's Triton causal conv (``ops/fla_conv.py``) against the exact torch conv.

The real kernels run on CPU only under Triton's interpreter, and ``TRITON_INTERPRET=1``
must be set before triton is first imported: those checks run in one subprocess,
this file executed as a script (``main()`` below), which prints its measurements as
JSON; the tests here read them (marked ``integration``: ≈20 s). They are skipped
when fla-core is not installed.

The loader's outcomes and the op's plumbing (document bounds, calls split at fla's
launch limits, autograd, opcheck) are also checked in-process with a torch stand-in
of fla's two functions, which needs neither fla nor the interpreter.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from torchtitan_nemotron3.ops import fla_conv, loader
from torchtitan_nemotron3.ops.conv import causal_conv1d
from torchtitan_nemotron3.ops.loader import KernelStatus

FLA_INSTALLED = importlib.util.find_spec("fla") is not None
FP32_TOL, BF16_TOL = 1e-6, 1e-2


# --- shared by the subprocess and the in-process tests ----------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (
        (a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)
    ).item()


def conv_inputs(B, L, X=24, K=4, dtype=torch.float32, seed=0, starts=None):
    """xBC as the mixer makes it (a strided slice of a wider in_proj output), weight,
    bias, and ``seq_idx`` from the document starts of each row (None: unpacked)."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(B, L, X + 24, generator=g).to(dtype)
    x = proj[..., 8 : 8 + X]
    assert L == 1 or not x.is_contiguous()
    w = (0.5 * torch.randn(X, K, generator=g)).to(dtype)
    b = (0.1 * torch.randn(X, generator=g)).to(dtype)
    seq_idx = None
    if starts is not None:
        new_doc = torch.zeros(B, L, dtype=torch.int32)
        for row, row_starts in enumerate(starts):
            new_doc[row, row_starts] = 1
        # rows continue the previous row's numbering: a row start must still split
        seq_idx = torch.cumsum(new_doc.flatten(), 0, dtype=torch.int32).view(B, L)
    return x, w, b, seq_idx


def run(conv, x, w, b, seq_idx, seed=1):
    """Output and (dx, dw, db) of ``conv`` under a fixed random upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = conv(*leaves, seq_idx)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    y.backward(dy.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


def torch_conv(x, w, b, seq_idx):
    """The reference, in fp32 (the kernel accumulates in fp32), output in x's dtype."""
    y = F.silu(causal_conv1d(x.float(), w.float(), b.float(), seq_idx))
    return y.to(x.dtype)


def errors(x, w, b, seq_idx) -> dict:
    y, grads = run(fla_conv.fla_causal_conv1d_silu, x, w, b, seq_idx)
    y_ref, grads_ref = run(torch_conv, x, w, b, seq_idx)
    out = {"y": rel_err(y, y_ref)}
    for name, g, g_ref, t in zip(("dx", "dw", "db"), grads, grads_ref, (x, w, b)):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        out[name] = rel_err(g, g_ref)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
    return out


# Cases: lengths not multiples of fla's chunk (64); a length-1 document at a row
# start, one in mid-row, one at the row's end; a document starting on a chunk edge.
PACKED_STARTS = [[0, 5, 6, 64, 69], [0, 1, 30]]
CASES = {
    "unpacked B=2 L=70": {"B": 2, "L": 70},
    "unpacked B=1 L=1": {"B": 1, "L": 1},
    "packed B=2 L=70": {"B": 2, "L": 70, "starts": PACKED_STARTS},
    "packed B=2 L=3 (1-token docs)": {"B": 2, "L": 3, "starts": [[0, 1, 2], [0, 2]]},
}


# --- the subprocess: real kernels under Triton's interpreter ----------------------------


def _pin_one_config() -> None:
    """The autotuner times its configs through the GPU driver, absent on CPU: keep one."""
    import triton
    from fla.modules.causal_conv1d import ops

    for kernel in (ops.causal_conv1d_fwd_kernel, ops.causal_conv1d_bwd_kernel):
        while not isinstance(kernel, triton.runtime.Autotuner):
            kernel = kernel.fn
        # 24 channels: two blocks of 16, the second one masked
        kernel.configs = [triton.Config({"BD": 16}, num_warps=4)]


def _isolation(dtype=torch.float32) -> dict:
    """A packed row equals each document convolved alone (by the kernel, unpacked)."""
    starts = [0, 5, 6, 64, 69]
    x, w, b, seq_idx = conv_inputs(1, 70, starts=[starts], dtype=dtype)
    y, (dx, dw, db) = run(fla_conv.fla_causal_conv1d_silu, x, w, b, seq_idx)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y_alone, dx_alone, dw_alone, db_alone = (
        [],
        [],
        torch.zeros_like(w),
        torch.zeros_like(b),
    )
    for lo, hi in zip(starts, starts[1:] + [70]):
        leaves = [
            x[:, lo:hi].detach().clone().requires_grad_(),
            w.clone().requires_grad_(),
            b.clone().requires_grad_(),
        ]
        y_doc = fla_conv.fla_causal_conv1d_silu(*leaves, None)
        y_doc.backward(dy[:, lo:hi])
        y_alone.append(y_doc.detach())
        dx_alone.append(leaves[0].grad)
        dw_alone += leaves[1].grad
        db_alone += leaves[2].grad
    return {
        "y": rel_err(y, torch.cat(y_alone, 1)),
        "dx": rel_err(dx, torch.cat(dx_alone, 1)),
        "dw": rel_err(dw, dw_alone),
        "db": rel_err(db, db_alone),
    }


def _split_calls() -> dict:
    """At most 2 chunks per fla call: rows / documents spread over several calls."""
    fla_conv.MAX_CHUNKS_PER_CALL = 2
    try:
        out = {
            "unpacked B=3 L=100": errors(*conv_inputs(3, 100)),
            "packed B=2 L=100": errors(
                *conv_inputs(2, 100, starts=[[0, 70], [0, 1, 65]])
            ),
        }
        try:
            fla_conv.fla_causal_conv1d_silu(*conv_inputs(1, 200, starts=[[0]]))
            out["too long"] = "no error"
        except ValueError as e:
            out["too long"] = str(e)
    finally:
        fla_conv.MAX_CHUNKS_PER_CALL = 65535
    return out


def _opcheck() -> dict:
    out = {}
    for name, starts in (("unpacked", None), ("packed", [[0, 7], [0, 1]])):
        x, w, b, seq_idx = conv_inputs(2, 20, X=24, starts=starts)
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        try:
            torch.library.opcheck(fla_conv.fla_conv_silu, (*leaves, seq_idx))
            dy = torch.randn(x.shape)
            torch.library.opcheck(
                fla_conv.fla_conv_silu_backward, (dy, x, w, b, seq_idx)
            )
            out[name] = "ok"
        except Exception as e:  # noqa: BLE001 - reported to the test
            out[name] = f"{type(e).__name__}: {e}"
    return out


def _compiled() -> dict:
    """``fullgraph=True`` around the op (its fake traced), fwd+bwd, against eager."""
    import torch._dynamo

    def block(x, w, b, seq_idx):
        return fla_conv.fla_causal_conv1d_silu(x * 2, w, b, seq_idx).pow(2)

    x, w, b, seq_idx = conv_inputs(2, 70, starts=PACKED_STARTS)
    y, grads = run(block, x, w, b, seq_idx)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y_c, grads_c = run(compiled, x, w, b, seq_idx)
    torch._dynamo.reset()
    return {
        "y": rel_err(y_c, y),
        **{n: rel_err(g_c, g) for n, g_c, g in zip(("dx", "dw", "db"), grads_c, grads)},
    }


def main() -> None:
    timings, out = {}, {"fla_imported_by_module_import": "fla" in sys.modules}

    def timed(name, fn):
        start = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - start, 2)
        return result

    status = timed("load", fla_conv.fla_conv_status)
    out["status"] = [status.available, status.detail]
    _pin_one_config()
    out["fp32"] = timed(
        "fp32", lambda: {n: errors(*conv_inputs(**c)) for n, c in CASES.items()}
    )
    out["bf16"] = timed(
        "bf16",
        lambda: {
            n: errors(*conv_inputs(**c, dtype=torch.bfloat16)) for n, c in CASES.items()
        },
    )
    x, w, b, seq_idx = conv_inputs(2, 70, starts=PACKED_STARTS, dtype=torch.bfloat16)
    out["bf16 x, fp32 weight+bias"] = timed(
        "mixed", lambda: errors(x, w.float(), b.float(), seq_idx)
    )
    out["isolation"] = timed("isolation", _isolation)
    out["split"] = timed("split", _split_calls)
    out["opcheck"] = timed("opcheck", _opcheck)
    out["compile"] = timed("compile", _compiled)
    out["timings_s"] = timings
    print(json.dumps(out))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
    sys.exit(0)


# --- the tests --------------------------------------------------------------------------


# All interpreted tests share one subprocess: ≈19 s of CPU (≈21 s wall on an idle
# 2-core box, up to 40 s when its cores are shared), so they are integration tests.
SUBPROCESS = pytest.mark.integration


@pytest.fixture(scope="module")
def interpreted() -> dict:
    if not FLA_INSTALLED:
        pytest.skip("fla-core is not installed (pip install fla-core)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@SUBPROCESS
def test_interpreted_loads_lazily(interpreted):
    assert interpreted["fla_imported_by_module_import"] is False
    available, detail = interpreted["status"]
    assert available, detail
    assert detail.startswith("fla-core ") and "through Triton's interpreter" in detail


@SUBPROCESS
def test_interpreted_fp32_matches_torch(interpreted):
    for case, errs in interpreted["fp32"].items():
        for name, err in errs.items():
            assert err <= FP32_TOL, (case, name, err)


@SUBPROCESS
def test_interpreted_bf16_matches_torch(interpreted):
    cases = {**interpreted["bf16"], "mixed": interpreted["bf16 x, fp32 weight+bias"]}
    for case, errs in cases.items():
        for name, err in errs.items():
            assert err <= BF16_TOL, (case, name, err)


@SUBPROCESS
def test_interpreted_documents_isolated(interpreted):
    for name, err in interpreted["isolation"].items():
        assert err <= FP32_TOL, (name, err)


@SUBPROCESS
def test_interpreted_split_calls(interpreted):
    split = interpreted["split"]
    assert "more than one fla conv call can take" in split.pop("too long")
    for case, errs in split.items():
        for name, err in errs.items():
            assert err <= FP32_TOL, (case, name, err)


@SUBPROCESS
def test_interpreted_opcheck(interpreted):
    assert interpreted["opcheck"] == {"unpacked": "ok", "packed": "ok"}


@SUBPROCESS
def test_interpreted_compile_fullgraph(interpreted):
    for name, err in interpreted["compile"].items():
        assert err <= FP32_TOL, (name, err)


# --- in-process: loader outcomes, and the op's plumbing on a torch stand-in ------------


@pytest.fixture
def fresh_loader():
    saved = dict(loader.LOADED)
    loader.LOADED.pop(fla_conv.LOADED_KEY, None)
    yield
    loader.LOADED.clear()
    loader.LOADED.update(saved)


def test_not_installed(fresh_loader, monkeypatch):
    monkeypatch.setattr(fla_conv, "FLA_PACKAGE", "nemotron3_no_such_fla")
    kernels, status = fla_conv.fla_conv_kernels()
    assert kernels is None and not status.available
    assert status.detail == "fla-core not installed"
    assert fla_conv.fla_conv_status() is status  # cached
    x, w, b, _ = conv_inputs(1, 8)
    with pytest.raises(RuntimeError, match="fla-core not installed"):
        fla_conv.fla_causal_conv1d_silu(x, w, b, None)


def _fake_fla(root, body: str) -> None:
    pkg = root / "nemotron3_fake_fla"
    (pkg / "modules").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "modules" / "__init__.py").write_text("")
    (pkg / "modules" / "conv_ops.py").write_text(body)


@pytest.mark.parametrize(
    "body, why",
    [
        (
            "raise ImportError('no triton here')",
            "import nemotron3_fake_fla.modules.conv_ops failed: no triton here",
        ),
        (
            "def causal_conv1d_fwd(x, weight): ...\ndef causal_conv1d_bwd(x, dy, weight): ...",
            "causal_conv1d_fwd has no bias, residual",
        ),
        ("", "lacks causal_conv1d_fwd/bwd"),
    ],
)
def test_unusable_package(fresh_loader, monkeypatch, tmp_path, body, why):
    _fake_fla(tmp_path, body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(fla_conv, "FLA_PACKAGE", "nemotron3_fake_fla")
    monkeypatch.setattr(
        fla_conv, "FLA_CONV_MODULE", "nemotron3_fake_fla.modules.conv_ops"
    )
    try:
        kernels, status = fla_conv.fla_conv_kernels()
        assert kernels is None and not status.available
        assert why in status.detail
        if body.startswith("raise"):  # a failed import leaves no half-made modules
            assert "nemotron3_fake_fla.modules.conv_ops" not in sys.modules
    finally:
        for name in [n for n in sys.modules if n.startswith("nemotron3_fake_fla")]:
            del sys.modules[name]


def _stand_in_seq_idx(x, cu_seqlens):
    if cu_seqlens is None:
        return None
    assert x.shape[0] == 1 and cu_seqlens.dtype == torch.int64
    lengths = cu_seqlens.diff()
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths)[None]


CALLS: list[tuple[int, int]] = []  # (batch, tokens) of each stand-in fwd and bwd call


def stand_in_fwd(
    x,
    weight,
    bias,
    residual,
    initial_state,
    output_final_state,
    activation,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
):
    assert residual is None and initial_state is None and not output_final_state
    assert activation == "silu" and weight.is_contiguous()
    CALLS.append(tuple(x.shape[:2]))
    return torch_conv(x, weight, bias, _stand_in_seq_idx(x, cu_seqlens)), None


def stand_in_bwd(
    x,
    dy,
    dht,
    weight,
    bias,
    residual,
    initial_state,
    activation,
    cu_seqlens=None,
    cu_seqlens_cpu=None,
):
    from reference_kernels import _autograd

    CALLS.append(tuple(x.shape[:2]))
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    with _autograd():
        y = torch_conv(*leaves, _stand_in_seq_idx(x, cu_seqlens))
        dx, dw, db = torch.autograd.grad(y, leaves, dy)
    return dx, dw, db, None, None


@pytest.fixture
def stand_in(fresh_loader, monkeypatch):
    status = KernelStatus("fla-core Triton conv", True, "torch stand-in")
    kernels = fla_conv.FlaConvKernels(fwd=stand_in_fwd, bwd=stand_in_bwd, status=status)
    loader.LOADED[fla_conv.LOADED_KEY] = (kernels, status)
    CALLS.clear()
    yield monkeypatch


@pytest.mark.parametrize(
    "limit, case, calls",
    [
        (65535, {"B": 2, "L": 70}, [(2, 70)] * 2),  # unpacked: the batch as is
        (65535, {"B": 2, "L": 70, "starts": PACKED_STARTS}, [(1, 140)] * 2),  # one row
        (2, {"B": 3, "L": 100}, [(1, 100)] * 6),  # 2 chunks per row, 2 per call
        (
            3,
            {"B": 2, "L": 100, "starts": [[0, 70], [0, 1, 65]]},
            [(1, 100)] * 4,
        ),  # 2+1 | 1+1+1
    ],
)
def test_stand_in_calls(stand_in, limit, case, calls):
    stand_in.setattr(fla_conv, "MAX_CHUNKS_PER_CALL", limit)
    for name, err in errors(*conv_inputs(**case)).items():
        assert err <= FP32_TOL, (name, err)
    assert CALLS == calls


def test_stand_in_bias_none_and_shapes(stand_in):
    x, w, _, seq_idx = conv_inputs(2, 9, starts=[[0, 3], [0]])
    y = fla_conv.fla_causal_conv1d_silu(x, w, None, seq_idx)
    torch.testing.assert_close(
        y, torch_conv(x, w, torch.zeros(24), seq_idx), rtol=0, atol=1e-6
    )
    with pytest.raises(ValueError, match="weight must be"):
        fla_conv.fla_causal_conv1d_silu(x, w.T, None, seq_idx)
    with pytest.raises(ValueError, match="seq_idx must be"):
        fla_conv.fla_causal_conv1d_silu(x, w, None, seq_idx[:, 1:])
    assert fla_conv.fla_conv_ineligible(x, w) == ""
    assert fla_conv.fla_conv_ineligible(x.double(), w) == "dtype torch.float64"


def test_stand_in_too_long_document(stand_in):
    stand_in.setattr(fla_conv, "MAX_CHUNKS_PER_CALL", 2)
    with pytest.raises(ValueError, match="a document of 200 tokens"):
        fla_conv.fla_causal_conv1d_silu(*conv_inputs(1, 200, starts=[[0]]))


def test_stand_in_opcheck(stand_in):
    x, w, b, seq_idx = conv_inputs(2, 20, starts=[[0, 7], [0, 1]])
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    torch.library.opcheck(fla_conv.fla_conv_silu, (*leaves, seq_idx))
    torch.library.opcheck(
        fla_conv.fla_conv_silu_backward, (torch.randn(x.shape), x, w, b, seq_idx)
    )
