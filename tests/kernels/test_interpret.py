"""The kernel path for real on CPU: mamba-ssm's Triton SSD and gated RMSNorm under Triton's
interpreter (``TRITON_INTERPRET=1``, ``ops/interpret.py``), against the torch path.

``TRITON_INTERPRET`` must be set before the kernels are imported (``triton.jit`` picks
the interpreter at decoration time), and setting it in the pytest process would turn
every Triton kernel imported later by any test into an interpreted one. So the
interpreted checks run in one subprocess, this file executed as a script (``main``
below) with ``TRITON_INTERPRET=1`` and CUDA hidden, which prints its measurements as
JSON; the tests here read them. A second, small subprocess without the variable
checks that then nothing changes. Both are skipped when mamba-ssm is not installed.

Errors are ``max |kernel - torch| / max |torch|`` per tensor, in fp32.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

MAMBA_INSTALLED = all(
    importlib.util.find_spec(name) is not None for name in ("mamba_ssm", "triton", "numpy")
)
NOT_INSTALLED = (
    "mamba-ssm (or triton/numpy) is not installed: MAMBA_FORCE_BUILD=TRUE "
    "MAMBA_SKIP_CUDA_BUILD=TRUE pip install --no-build-isolation --no-deps "
    "mamba-ssm==2.3.2.post1 (as .ci/run does)"
)
OUTPUT_TOL = 1e-5  # fp32: outputs, logits
GRAD_TOL = 1e-4  # fp32: every input and parameter gradient
BF16_TOL = 1e-2
SCAN_NAMES = ("x_BLHP", "dt_BLH", "A_H", "B_BLGN", "C_BLGN", "D_H", "dt_bias_H")
# Binds at both ends: softplus(dt + dt_bias) spans ~0.02..0.6 for mamba_inputs.
DT_LIMIT = (0.05, 0.2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# --- the subprocesses: executed as a script ---------------------------------------------


def _counting_kernels() -> dict:
    """Count the calls of the loaded mamba-ssm and fla-core kernels (to show they
    really ran)."""
    import dataclasses

    from torchtitan_nemotron3.ops import loader
    from torchtitan_nemotron3.ops.fla_conv import LOADED_KEY, fla_conv_kernels

    kernels, status = loader.ssd_kernels()
    calls = {}

    def counted(name, fn):
        def inner(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return inner

    fields = ("fwd", "bwd", "norm_fwd", "norm_bwd")
    loader.LOADED["ssd"] = (
        dataclasses.replace(
            kernels, **{f: counted(f, getattr(kernels, f)) for f in fields}
        ),
        status,
    )
    conv, conv_status = fla_conv_kernels()
    if conv is not None:
        loader.LOADED[LOADED_KEY] = (
            dataclasses.replace(
                conv, fwd=counted("conv_fwd", conv.fwd), bwd=counted("conv_bwd", conv.bwd)
            ),
            conv_status,
        )
    return calls


def _plumbing() -> dict:
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    from torchtitan_nemotron3.ops import interpret, kernel_ops, loader

    out = {"imported_before_use": "mamba_ssm.ops.triton.ssd_combined" in sys.modules}
    kernels, status = loader.ssd_kernels()
    out["status"] = [status.available, status.detail]
    out["devices"] = sorted(kernels.devices)
    out["has_norm"] = kernels.norm_fwd is not None and kernels.norm_bwd is not None
    modules = [m for n, m in sys.modules.items() if n.startswith("mamba_ssm.ops.triton.")]
    tuners, interpreted, proxied = [], 0, 0
    for module in modules:
        proxied += module.__dict__.get("torch") is interpret.TORCH_ON_CPU
        for value in vars(module).values():
            for k in interpret._kernel_chain(value):
                if isinstance(k, Autotuner):
                    tuners.append(len(k.configs))
                interpreted += isinstance(k, InterpretedFunction)
    out["autotuner_configs"] = sorted(set(tuners))
    out["n_autotuners"] = len(tuners)
    out["n_interpreted"] = interpreted
    out["n_proxied_modules"] = proxied
    # torch itself is untouched: outside the kernel modules CPU indices still fail
    try:
        with torch.cuda.device(None):
            pass
        out["torch_cuda_device_patched"] = True
    except Exception:  # noqa: BLE001
        out["torch_cuda_device_patched"] = False
    out["auto_plan_cpu"] = kernel_ops.auto_plan("cpu")
    return out


def _scan(ops, inp, dt_limit, chunk_size):
    t = {n: inp[n].detach().clone().requires_grad_() for n in SCAN_NAMES}
    y = ops.scan(
        *(t[n] for n in SCAN_NAMES[:5]),
        D_H=t["D_H"],
        dt_bias_H=t["dt_bias_H"],
        dt_limit=dt_limit,
        chunk_size=chunk_size,
        seq_idx_BL=inp["seq_idx_BL"],
    )
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(dy)
    return {"out": y, **{f"d{n}": t[n].grad for n in SCAN_NAMES}}


def _ssd() -> dict:
    """Packed documents, L = 40 in chunks of 16, 2 groups, D, dt_bias, dt_limit binding."""
    import torch.nn.functional as F
    from _kernel_helpers import mamba_inputs

    from torchtitan_nemotron3.ops import CudaMambaOps, TorchMambaOps

    inp = mamba_inputs(Bsz=2, L=40, H=4, P=16, G=2, N=16, packed=True)
    dt = F.softplus(inp["dt_BLH"] + inp["dt_bias_H"])
    lo, hi = DT_LIMIT
    ours = _scan(CudaMambaOps(), inp, DT_LIMIT, 16)
    ref = _scan(TorchMambaOps(), inp, DT_LIMIT, 16)
    return {
        "documents_per_row": (inp["seq_idx_BL"][:, -1] + 1).tolist(),
        "dt_clamped_low": (dt < lo).float().mean().item(),
        "dt_clamped_high": (dt > hi).float().mean().item(),
        "errors": {n: rel_err(ours[n], ref[n]) for n in ref},
    }


def _ssd_long_rows() -> dict:
    """The cuda backend's SSD with the 32-bit offset limit lowered so that each row is
    cut into pieces (state carried across the cuts, packed documents crossing them)
    against the same call in one piece."""
    from _kernel_helpers import mamba_inputs

    from torchtitan_nemotron3.ops import CudaMambaOps, kernel_ops, long_rows

    inp = mamba_inputs(Bsz=2, L=40, H=4, P=16, G=2, N=16, packed=True)
    whole = _scan(CudaMambaOps(), inp, DT_LIMIT, 8)
    args = [inp[n] for n in ("x_BLHP", "dt_BLH", "B_BLGN", "C_BLGN")]
    one_row_two_chunks = long_rows.ssd_elements(1, 16, *args, 8)
    saved, long_rows.OFFSET_LIMIT = long_rows.OFFSET_LIMIT, one_row_two_chunks + 1
    try:
        plan, _ = kernel_ops.ssd_pieces(*args, 8)
        cut = _scan(CudaMambaOps(), inp, DT_LIMIT, 8)
    finally:
        long_rows.OFFSET_LIMIT = saved
    return {
        "row_bounds": plan[0],
        "seq_bounds": plan[1],
        "errors": {n: rel_err(cut[n], whole[n]) for n in whole},
    }


def _norm_inputs(dtype, Bsz=2, L=12, I=64, extra=40):
    """y (B, L, I); z taken as the first I channels of ``zx`` (B, L, I + extra), as the
    mixer slices z out of the in_proj output; the weight."""
    g = torch.Generator().manual_seed(2)
    y = torch.randn(Bsz, L, I, generator=g).to(dtype)
    zx = torch.randn(Bsz, L, I + extra, generator=g).to(dtype)
    weight = (1 + 0.3 * torch.randn(I, generator=g)).to(dtype)
    return y, zx, weight


def _norm_run(ops, y, zx, weight, n_groups, eps=1e-5):
    y, zx, weight = (t.clone().requires_grad_() for t in (y, zx, weight))
    out = ops.gated_norm(y, zx[..., : y.shape[-1]], weight, eps=eps, n_groups=n_groups)
    out = out.to(y.dtype)  # (torch: promoted with the weight's dtype)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    out.backward(dout.to(out.dtype))
    return {"out": out, "dy": y.grad, "dzx": zx.grad, "dweight": weight.grad}


def _norm() -> dict:
    from torchtitan_nemotron3.ops import CudaMambaOps, TorchMambaOps

    res = {}
    for dtype, n_groups in ((torch.float32, 2), (torch.float32, 1), (torch.bfloat16, 4)):
        y, z, w = _norm_inputs(dtype)
        ours = _norm_run(CudaMambaOps(), y, z, w, n_groups)
        ref = _norm_run(TorchMambaOps(), y, z, w, n_groups)
        res[f"{str(dtype)[6:]}, {n_groups} groups"] = {
            n: rel_err(ours[n], ref[n]) for n in ref
        }
    return res


def _norm_opcheck() -> dict:
    from torchtitan_nemotron3.ops.norm_kernel import gated_rmsnorm_fwd

    y, zx, w = _norm_inputs(torch.float32, Bsz=1, L=6, I=16, extra=8)
    zx.requires_grad_()
    args = (y.requires_grad_(), zx[..., :16], w.requires_grad_(), 1e-5, 8)
    torch.library.opcheck(gated_rmsnorm_fwd, args)
    return {"opcheck": "passed"}


def _grads(module) -> dict:
    return {n: p.grad for n, p in sorted(module.named_parameters())}


def _mixer(backend: str) -> dict:
    """One Mamba2 mixer, packed documents, every parameter's and the input's gradient."""
    from _kernel_helpers import build, mamba_args, mamba_inputs

    args = mamba_args(hybrid_override_pattern="M")
    seq_idx = mamba_inputs(L=40)["seq_idx_BL"]
    h = torch.randn(2, 40, args.hidden_size, generator=torch.Generator().manual_seed(4))
    runs = {}
    for b in (backend, "torch"):
        mixer = build(args, b).layers["0"].mixer
        x = h.clone().requires_grad_()
        out = mixer(x, seq_idx)
        out.pow(2).sum().backward()
        runs[b] = {"out": out, "dx": x.grad, **_grads(mixer)}
    return {n: rel_err(runs[backend][n], runs["torch"][n]) for n in runs["torch"]}


def _model(backend: str) -> dict:
    """``mamba_args()``: pattern M*ME, packed rows of 45 tokens (chunks of 16)."""
    from _kernel_helpers import build, mamba_args, packed_positions

    args = mamba_args()
    tokens = torch.randint(
        0, args.vocab_size, (2, 45), generator=torch.Generator().manual_seed(5)
    )
    positions = packed_positions(2, [12, 20, 13])
    runs = {}
    for b in (backend, "torch"):
        model = build(args, b)
        logits = model(tokens, positions=positions)
        logits.pow(2).mean().backward()
        runs[b] = {"logits": logits, **_grads(model)}
    return {n: rel_err(runs[backend][n], runs["torch"][n]) for n in runs["torch"]}


def main_interpreted() -> dict:
    import traceback

    from torchtitan_nemotron3.ops import interpret

    out = {"active": interpret.active(), "timings_s": {}}
    checks = {
        "plumbing": _plumbing,
        "ssd": _ssd,
        "ssd_long_rows": _ssd_long_rows,
        "norm": _norm,
        "norm_opcheck": _norm_opcheck,
        # Both backends take mamba-ssm's SSD and norm and fla-core's conv (all
        # Triton) here: the mixer (its input's gradient too) through ``auto``'s
        # choice, the model through ``cuda``; the kernel counts show each dispatch.
        "mixer_auto": lambda: _mixer("auto"),
        "model_cuda": lambda: _model("cuda"),
    }
    calls = None
    for name, check in checks.items():
        if name == "ssd":  # after the plumbing has looked at the loaded kernels
            calls = _counting_kernels()
        start = time.perf_counter()
        try:
            out[name] = check()
        except Exception:  # noqa: BLE001 - reported to the test that reads it
            out[name] = {"error": traceback.format_exc()[-3000:]}
        out["timings_s"][name] = round(time.perf_counter() - start, 2)
        if calls is not None:
            out.setdefault("kernel_calls", {})[name] = dict(calls)
            calls.clear()
    return out


def main_plain() -> dict:
    """Without the interpreter: a model builds and trains on the torch path, bit for
    bit, and nothing of mamba-ssm (or fla) is imported."""
    import logging

    from torchtitan_nemotron3 import model_registry
    from torchtitan_nemotron3.ops import interpret, loader

    messages = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger().addHandler(Keep())
    logging.getLogger().setLevel(logging.INFO)
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(6))
    runs = {}
    for backend in ("auto", "torch"):
        config = model_registry("debugmodel", kernel_backend=backend).model
        with torch.device("meta"):
            model = config.build()
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        with torch.no_grad():
            model.init_states()
        logits = model(tokens)
        logits.pow(2).mean().backward()
        runs[backend] = [logits] + [p.grad for _, p in sorted(model.named_parameters())]
    return {
        "active": interpret.active(),
        "bitwise_equal": all(
            torch.equal(a, b) for a, b in zip(runs["auto"], runs["torch"])
        ),
        "kernel_modules": sorted(
            n
            for n in sys.modules
            if n.split(".")[0] in ("mamba_ssm", "fla", "causal_conv1d")
        ),
        "loaded": sorted(loader.LOADED),
        "auto_log": [m for m in messages if "kernel_backend='auto'" in m],
    }


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]  # _kernel_helpers, nemotron_testing
    torch.set_num_threads(1)
    result = main_interpreted() if sys.argv[1:] == ["interpreted"] else main_plain()
    print("RESULT" + json.dumps(result))
    sys.exit(0)


# --- in this process: the plumbing, without mamba-ssm ---------------------------------


def test_interpret_applies_only_when_requested_and_without_cuda(monkeypatch):
    from torchtitan_nemotron3.ops import interpret

    cases = {"1": True, "true": True, "ON": True, "Y": True,
             "0": False, "": False, " 1": False, "t": False}  # fmt: skip
    for value, requested in cases.items():
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert interpret.requested() is requested, value
        if importlib.util.find_spec("triton"):  # triton reads it the same way
            from triton import knobs

            assert knobs.runtime.interpret is requested, value
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert interpret.active() is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert interpret.active() is False  # a GPU machine: the kernels run on it
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert interpret.active() is False


def test_kernel_modules_see_cpu_answers_torch_does_not():
    from torchtitan_nemotron3.ops import interpret

    proxy = interpret.TORCH_ON_CPU
    assert proxy.float32 is torch.float32 and proxy.empty is torch.empty
    assert proxy.cuda.is_available is torch.cuda.is_available
    for index in (None, torch.device("cpu"), "cpu"):
        with proxy.cuda.device(index):
            pass
    props = proxy.cuda.get_device_properties(torch.device("cpu"))
    assert props.multi_processor_count == interpret.CPU_MULTIPROCESSORS
    assert torch.cuda.device is not proxy.cuda.device


def _fake_kernel_module(monkeypatch, package: str, kernel) -> object:
    import types

    module = types.ModuleType(f"{package}.ops.triton.fake")
    module.torch, module.kernel = torch, kernel
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def _add(X, Y, BLOCK: "tl.constexpr"):  # noqa: F821 - never launched
    pass


def test_prepare_pins_one_config_and_the_cpu_torch(monkeypatch):
    triton = pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from torchtitan_nemotron3.ops import interpret

    configs = [triton.Config({"BLOCK": b}) for b in (16, 32, 64)]
    tuned = triton.autotune(configs=configs, key=[])(InterpretedFunction(_add))
    module = _fake_kernel_module(monkeypatch, "nemotron3_fake", tuned)
    assert interpret.prepare("nemotron3_fake") == ""
    assert tuned.configs == configs[:1]
    assert module.torch is interpret.TORCH_ON_CPU
    assert interpret.prepare("nemotron3_fake") == ""  # idempotent


def test_prepare_refuses_kernels_compiled_for_the_gpu(monkeypatch):
    """``TRITON_INTERPRET`` set after the kernels were decorated: they are compiled
    ``JITFunction``s, which cannot take CPU tensors; the loader then keeps them on CUDA."""
    triton = pytest.importorskip("triton")
    from torchtitan_nemotron3.ops import interpret

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernel = triton.jit(_add)
    module = _fake_kernel_module(monkeypatch, "nemotron3_fake", kernel)
    why = interpret.prepare("nemotron3_fake")
    assert "compiled for the GPU" in why and "nemotron3_fake.ops.triton.fake.kernel" in why
    assert module.torch is torch


# --- the tests on the subprocesses --------------------------------------------------------


def _run_script(mode: str, interpret: bool) -> dict:
    if not MAMBA_INSTALLED:
        pytest.skip(NOT_INSTALLED)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT") :])
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=1))
    return result


# One subprocess for all interpreted checks (≈85 s on the 2-core box, 2026-12-02:
# SSD 9 s, long rows 27 s, norm 2 s, mixer 13 s, model 26 s, the rest imports) and
# one for the plain check (≈5 s): integration tests, like every test that starts a
# process.
SUBPROCESS = pytest.mark.integration


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return _run_script("interpreted", interpret=True)


def check(result: dict, name: str) -> dict:
    entry = result[name]
    assert "error" not in entry, entry.get("error")
    return entry


@SUBPROCESS
def test_interpreter_runs_the_loaded_kernels_on_cpu(interpreted):
    assert interpreted["active"] is True
    p = check(interpreted, "plumbing")
    assert p["imported_before_use"] is False
    available, detail = p["status"]
    assert available and "through Triton's interpreter" in detail, detail
    assert p["devices"] == ["cpu", "cuda"] and p["has_norm"]
    assert p["n_autotuners"] > 10 and p["autotuner_configs"] == [1]
    assert p["n_interpreted"] > 10 and p["n_proxied_modules"] >= 5
    assert p["torch_cuda_device_patched"] is False  # only the kernel modules see it
    assert "SSD -> kernel (mamba-ssm Triton SSD" in p["auto_plan_cpu"]


@SUBPROCESS
def test_ssd_kernel_matches_torch(interpreted):
    r = check(interpreted, "ssd")
    assert r["documents_per_row"] == [3, 4]
    assert r["dt_clamped_low"] > 0.05 and r["dt_clamped_high"] > 0.05  # binding
    assert r["errors"]["out"] <= OUTPUT_TOL, r["errors"]
    assert max(r["errors"].values()) <= GRAD_TOL, r["errors"]
    assert interpreted["kernel_calls"]["ssd"] == {"fwd": 1, "bwd": 1}


@SUBPROCESS
def test_long_rows_cut_into_pieces_equal_one_call(interpreted):
    r = check(interpreted, "ssd_long_rows")
    assert r["row_bounds"] == [0, 1, 2] and len(r["seq_bounds"]) > 2, r
    assert max(r["errors"].values()) <= 1e-6, r["errors"]
    n = len(r["seq_bounds"]) - 1
    assert interpreted["kernel_calls"]["ssd_long_rows"] == {"fwd": 1 + 2 * n, "bwd": 1 + 2 * n}


@SUBPROCESS
def test_gated_norm_kernel_matches_torch(interpreted):
    r = check(interpreted, "norm")
    for case, errors in r.items():
        tol = (OUTPUT_TOL, GRAD_TOL) if case.startswith("float32") else (BF16_TOL,) * 2
        assert errors["out"] <= tol[0], (case, errors)
        assert max(errors.values()) <= tol[1], (case, errors)
    assert interpreted["kernel_calls"]["norm"] == {"norm_fwd": 3, "norm_bwd": 3}
    check(interpreted, "norm_opcheck")


@SUBPROCESS
def test_mixer_on_kernels_matches_torch(interpreted):
    """``auto`` takes mamba-ssm's SSD and norm and fla-core's conv (all Triton) here."""
    errors = check(interpreted, "mixer_auto")
    assert errors["out"] <= OUTPUT_TOL, errors
    assert max(errors.values()) <= GRAD_TOL, errors
    calls = interpreted["kernel_calls"]["mixer_auto"]
    assert calls == {"fwd": 1, "bwd": 1, "norm_fwd": 1, "norm_bwd": 1, "conv_fwd": 1, "conv_bwd": 1}


@SUBPROCESS
def test_model_on_kernels_matches_torch(interpreted):
    errors = check(interpreted, "model_cuda")
    assert errors["logits"] <= OUTPUT_TOL, errors
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_TOL, (worst, errors[worst])
    calls = interpreted["kernel_calls"]["model_cuda"]  # two Mamba layers
    assert calls == {"fwd": 2, "bwd": 2, "norm_fwd": 2, "norm_bwd": 2, "conv_fwd": 2, "conv_bwd": 2}


@SUBPROCESS
def test_without_the_interpreter_nothing_changes():
    """No ``TRITON_INTERPRET``, no CUDA, mamba-ssm installed: ``auto`` is the torch path
    bit for bit and building/running a model imports no kernel package."""
    r = _run_script("plain", interpret=False)
    assert r["active"] is False
    assert r["bitwise_equal"] is True
    assert r["kernel_modules"] == [] and r["loaded"] == []
    assert r["auto_log"] == [
        "Mamba2 ops (kernel_backend='auto', cpu): conv -> torch (tensors on cpu); "
        "SSD -> torch (tensors on cpu)"
    ]
