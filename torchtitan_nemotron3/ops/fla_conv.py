"""fla-core's Triton causal conv as ``torch.library`` custom ops: a conv kernel with no nvcc build.

Why a second conv kernel: causal-conv1d ships sdists only, so its CUDA extension is
compiled against the installed torch, per GPU architecture (≈6 min for sm_90 alone on
2 cores, ≈33 min for the stock build; a B200 (sm_100) needs its own build). fla-core
(flash-linear-attention's kernels, MIT, pure Triton, depends only on einops) is a
plain ``pip install fla-core``: Triton JIT-compiles its conv for whichever GPU it
runs on. Written against fla-core 0.6.0 (``fla.modules.causal_conv1d.ops``).

Semantics are ``TorchMambaOps.conv``'s: ``silu(bias + causal depthwise conv(x))``
per channel, (B, L, X) in and out, packed documents given by ``seq_idx`` (B, L)
(non-decreasing per row: a tap reading an earlier document is dropped, exactly as
if each document were convolved alone). fla takes packed documents only as one
row (batch 1) with ``cu_seqlens``: a packed batch is flattened to one row of B·L
tokens whose document bounds are every change of ``seq_idx`` plus every row start.
Unpacked, the batch goes to fla as is.

Layout: fla reads ``x`` through its strides (batch, token, channel), so the mixer's
``xBC`` (a non-contiguous slice of the ``in_proj`` output) is used without a copy;
the flattening to one row is a view for such slices. Weight and bias are made
contiguous (fla's kernels index them densely). The output and ``dx`` are
contiguous (B, L, X) in ``x``'s dtype; ``dweight``/``dbias`` are accumulated in fp32
and returned in their parameters' dtypes.

Size limits of fla's launch, handled here: the conv grid's second axis is the
number of 64-token chunks (CUDA allows 65535), and the backward's per-chunk fp32
partial gradients (chunks, X, K) are indexed in 32 bits. A call past either is
split into several fla calls over whole documents (rows when unpacked), their
weight/bias gradients summed; only a single document longer than the limit is
refused.

Nothing is imported when this module is imported: ``fla_conv_kernels()`` loads
fla on first use and caches the outcome in ``loader.LOADED["fla_conv"]``
(available, or why not), as ``loader.conv_kernels()`` does for causal-conv1d.
"""

import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import interpret, loader
from .conv_kernel import register_conv_autograd
from .loader import KernelStatus

FLA_PACKAGE = "fla"
FLA_DISTRIBUTION = "fla-core"
FLA_CONV_MODULE = "fla.modules.causal_conv1d.ops"
FLA_TESTED_VERSION = "0.6.0"
LOADED_KEY = "fla_conv"

# fla's conv works on chunks of this many tokens (its default ``chunk_size``).
FLA_CHUNK = 64
# Chunks one fla call may have: the grid's second axis on CUDA (2**16 - 1). Tests lower
# it to exercise the split path.
MAX_CHUNKS_PER_CALL = 65535
# fla's backward indexes its (chunks, X, K) fp32 partial gradients with 32-bit offsets.
_PARTIAL_LIMIT = 2**31

_FWD_ARGS = (
    "x",
    "weight",
    "bias",
    "residual",
    "initial_state",
    "output_final_state",
    "activation",
    "cu_seqlens",
    "cu_seqlens_cpu",
)
_BWD_ARGS = (
    "x",
    "dy",
    "dht",
    "weight",
    "bias",
    "residual",
    "initial_state",
    "activation",
    "cu_seqlens",
    "cu_seqlens_cpu",
)


@dataclass(frozen=True)
class FlaConvKernels:
    """fla-core's conv functions, with their exact signatures (``x`` is (B, T, D),
    ``weight`` (D, W), ``cu_seqlens`` int64 (N + 1,) with B == 1):

    ``fwd(x=, weight=, bias=, residual=, initial_state=, output_final_state=,
    activation=, cu_seqlens=, cu_seqlens_cpu=)`` → ``(y, final_state)``;
    ``bwd(x=, dy=, dht=, weight=, bias=, residual=, initial_state=, activation=,
    cu_seqlens=, cu_seqlens_cpu=)`` → ``(dx, dweight, dbias, dresidual, dinitial_state)``.
    """

    fwd: Callable
    bwd: Callable
    status: KernelStatus
    devices: frozenset[str] = field(default_factory=lambda: frozenset({"cuda"}))


def _version() -> str:
    try:
        return importlib.metadata.version(FLA_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def _fla_modules() -> set[str]:
    return {
        n for n in sys.modules if n == FLA_PACKAGE or n.startswith(FLA_PACKAGE + ".")
    }


def _missing_args(fn: Callable, names: tuple[str, ...]) -> list[str]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return list(names)
    return [n for n in names if n not in params]


def _load_fla_conv() -> tuple[FlaConvKernels | None, KernelStatus]:
    name = "fla-core Triton conv"
    if FLA_PACKAGE not in sys.modules:
        try:
            found = (
                importlib.util.find_spec(FLA_PACKAGE) is not None
            )  # runs no fla code
        except (ImportError, ValueError) as e:
            return None, KernelStatus(name, False, f"fla cannot be located: {e}")
        if not found:
            return None, KernelStatus(name, False, f"{FLA_DISTRIBUTION} not installed")
    before = _fla_modules()
    try:
        ops = importlib.import_module(FLA_CONV_MODULE)
    except Exception as e:  # noqa: BLE001 - e.g. no triton, or an incompatible one
        # Modules of a failed import are half-initialised: forget them.
        for module in _fla_modules() - before:
            sys.modules.pop(module, None)
        return None, KernelStatus(name, False, f"import {FLA_CONV_MODULE} failed: {e}")
    fwd = getattr(ops, "causal_conv1d_fwd", None)
    bwd = getattr(ops, "causal_conv1d_bwd", None)
    version = _version()
    problems = []
    if fwd is None or bwd is None:
        problems.append("lacks causal_conv1d_fwd/bwd")
    else:
        for fn, names in ((fwd, _FWD_ARGS), (bwd, _BWD_ARGS)):
            missing = _missing_args(fn, names)
            if missing:
                problems.append(f"{fn.__name__} has no {', '.join(missing)}")
    if problems:
        return None, KernelStatus(
            name,
            False,
            f"{FLA_DISTRIBUTION} {version} {'; '.join(problems)} "
            f"(written against {FLA_TESTED_VERSION})",
        )
    detail = f"{FLA_DISTRIBUTION} {version}"
    devices = {"cuda"}
    if interpret.active():
        why_not = interpret.prepare(FLA_CONV_MODULE)
        if why_not:
            detail += f"; not on CPU: {why_not}"
        else:
            devices.add("cpu")
            detail += "; on CPU tensors through Triton's interpreter"
    status = KernelStatus(name, True, detail)
    kernels = FlaConvKernels(fwd=fwd, bwd=bwd, status=status, devices=frozenset(devices))
    return kernels, status


def fla_conv_kernels() -> tuple[FlaConvKernels | None, KernelStatus]:
    """fla-core's conv, loaded on first call and cached in ``loader.LOADED["fla_conv"]``:
    ``(kernels, status)``, ``kernels`` None and ``status.detail`` saying why when unusable."""
    if LOADED_KEY not in loader.LOADED:
        loader.LOADED[LOADED_KEY] = _load_fla_conv()
    return loader.LOADED[LOADED_KEY]


def fla_conv_status() -> KernelStatus:
    """Whether fla-core's conv is usable (``.available``) and which version, or why not
    (``.detail``). Loads fla on first call."""
    return fla_conv_kernels()[1]


_FLA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fla_conv_ineligible(xBC_BLX: torch.Tensor, weight_XK: torch.Tensor) -> str:
    """Why fla's conv cannot take this call ("" if it can). Any width, channel count,
    strides and size are fine (large calls are split, see the module docstring)."""
    for t in (xBC_BLX, weight_XK):
        if t.dtype not in _FLA_DTYPES:
            return f"dtype {t.dtype}"
    return ""


def _require() -> FlaConvKernels:
    kernels, status = fla_conv_kernels()
    if kernels is None:
        raise RuntimeError(f"the fla-core conv kernel is not usable ({status})")
    return kernels


# --- how one (B, L, X) call maps onto fla calls ------------------------------------------


@dataclass(frozen=True)
class _Piece:
    """One fla call on tokens [start, stop) of the flattened (B·L) row, documents at
    ``cu_cpu`` (int64, relative to ``start``)."""

    start: int
    stop: int
    cu_cpu: torch.Tensor


def _chunks(lengths):
    return (lengths + FLA_CHUNK - 1) // FLA_CHUNK


def _max_chunks(X: int, K: int) -> int:
    return min(MAX_CHUNKS_PER_CALL, (_PARTIAL_LIMIT - 1) // max(X * K, 1))


def _pieces(
    B: int, L: int, X: int, K: int, seq_idx_BL: torch.Tensor | None
) -> list[_Piece] | None:
    """``None``: one unpacked fla call on the batch as is. Otherwise the varlen calls:
    one in the usual case, more when the chunks exceed what one call can take."""
    limit = _max_chunks(X, K)
    if seq_idx_BL is None and B * _chunks(L) <= limit and B * L < 2**31:
        return None
    if seq_idx_BL is None:
        starts = torch.arange(0, B * L, L, dtype=torch.int64)
    else:
        seq = seq_idx_BL.detach().to("cpu", torch.int64)  # the one host sync
        new_doc_BL = torch.ones(B, L, dtype=torch.bool)
        new_doc_BL[:, 1:] = seq[:, 1:] != seq[:, :-1]
        starts = new_doc_BL.reshape(-1).nonzero().squeeze(1)
    bounds = torch.cat([starts, torch.tensor([B * L])])
    chunks = _chunks(bounds.diff())
    if chunks.sum().item() <= limit:
        return [_Piece(0, B * L, bounds)]
    if chunks.max().item() > limit:
        raise ValueError(
            f"a document of {bounds.diff().max().item()} tokens is more than one fla "
            f"conv call can take ({limit} chunks of {FLA_CHUNK} at {X} channels)"
        )
    pieces, first, total = [], 0, 0
    for i, c in enumerate(chunks.tolist()):
        if total + c > limit:
            pieces.append(bounds[first : i + 1])
            first, total = i, 0
        total += c
    pieces.append(bounds[first:])
    return [_Piece(int(b[0]), int(b[-1]), b - b[0]) for b in pieces]


def _varlen(piece: _Piece, device: torch.device) -> dict:
    return {
        "cu_seqlens": piece.cu_cpu.to(device, non_blocking=True),
        "cu_seqlens_cpu": piece.cu_cpu,
    }


# --- the custom ops ---------------------------------------------------------------------


@torch.library.custom_op("nemotron3::fla_causal_conv1d_silu", mutates_args=())
def fla_conv_silu(
    x_BLX: torch.Tensor,
    weight_XK: torch.Tensor,
    bias_X: torch.Tensor,
    seq_idx_BL: torch.Tensor | None,
) -> torch.Tensor:
    """``silu(bias + causal depthwise conv(x))`` per channel, documents kept apart."""
    kernels = _require()
    B, L, X = x_BLX.shape
    K = weight_XK.shape[1]
    if x_BLX.numel() == 0:
        return torch.empty((B, L, X), dtype=x_BLX.dtype, device=x_BLX.device)
    common = {
        "weight": weight_XK.contiguous(),
        "bias": bias_X.contiguous(),
        "residual": None,
        "initial_state": None,
        "output_final_state": False,
        "activation": "silu",
    }
    pieces = _pieces(B, L, X, K, seq_idx_BL)
    if pieces is None:
        y, _ = kernels.fwd(x=x_BLX, cu_seqlens=None, cu_seqlens_cpu=None, **common)
        return y.reshape(B, L, X).contiguous()
    x_1TX = x_BLX.reshape(1, B * L, X)  # a view for the mixer's slices
    ys = [
        kernels.fwd(
            x=x_1TX[:, p.start : p.stop],
            **_varlen(p, x_BLX.device),
            **common,
        )[0]
        for p in pieces
    ]
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)
    return y.reshape(B, L, X).contiguous()


@torch.library.custom_op("nemotron3::fla_causal_conv1d_silu_backward", mutates_args=())
def fla_conv_silu_backward(
    dout_BLX: torch.Tensor,
    x_BLX: torch.Tensor,
    weight_XK: torch.Tensor,
    bias_X: torch.Tensor,
    seq_idx_BL: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for (x, weight, bias), each in its input's dtype, contiguous."""
    kernels = _require()
    B, L, X = x_BLX.shape
    K = weight_XK.shape[1]
    if x_BLX.numel() == 0:
        return (
            torch.zeros((B, L, X), dtype=x_BLX.dtype, device=x_BLX.device),
            torch.zeros_like(weight_XK, memory_format=torch.contiguous_format),
            torch.zeros_like(bias_X, memory_format=torch.contiguous_format),
        )
    common = {
        "weight": weight_XK.contiguous(),
        "bias": bias_X.contiguous(),
        "residual": None,
        "initial_state": None,
        "dht": None,
        "activation": "silu",
    }
    dout_BLX = dout_BLX.contiguous()
    pieces = _pieces(B, L, X, K, seq_idx_BL)
    if pieces is None:
        dx, dw, db, _, _ = kernels.bwd(
            x=x_BLX, dy=dout_BLX, cu_seqlens=None, cu_seqlens_cpu=None, **common
        )
    else:
        x_1TX = x_BLX.reshape(1, B * L, X)
        dy_1TX = dout_BLX.reshape(1, B * L, X)
        grads = [
            kernels.bwd(
                x=x_1TX[:, p.start : p.stop],
                dy=dy_1TX[:, p.start : p.stop],
                **_varlen(p, x_BLX.device),
                **common,
            )[:3]
            for p in pieces
        ]
        if len(grads) == 1:
            dx, dw, db = grads[0]
        else:
            dx = torch.cat([g[0] for g in grads], dim=1)
            dw = torch.stack([g[1].float() for g in grads]).sum(0)
            db = torch.stack([g[2].float() for g in grads]).sum(0)
    return (
        dx.reshape(B, L, X).to(x_BLX.dtype).contiguous(),
        dw.to(weight_XK.dtype).contiguous(),
        db.to(bias_X.dtype).contiguous(),
    )


register_conv_autograd(fla_conv_silu, fla_conv_silu_backward)


# --- what the backends call -------------------------------------------------------------


def fla_causal_conv1d_silu(
    xBC_BLX: torch.Tensor,
    weight_XK: torch.Tensor,
    bias_X: torch.Tensor | None,
    seq_idx_BL: torch.Tensor | None,
) -> torch.Tensor:
    """``TorchMambaOps.conv`` on fla-core's Triton kernel: ``silu(causal depthwise
    conv1d(xBC))`` (B, L, X) in ``xBC``'s dtype, documents of ``seq_idx`` kept apart.

    ``weight_XK`` is (X, K), ``bias_X`` (X,) or None (zeros), ``seq_idx_BL`` (B, L)
    integer, non-decreasing per row, or None. Differentiable in x, weight and bias;
    compiles under ``fullgraph=True`` (an opaque custom op). Raises RuntimeError when
    fla-core is not usable (see ``fla_conv_status()``).
    """
    if xBC_BLX.dim() != 3:
        raise ValueError(f"xBC must be (B, L, X), got shape {tuple(xBC_BLX.shape)}")
    B, L, X = xBC_BLX.shape
    if weight_XK.dim() != 2 or weight_XK.shape[0] != X:
        raise ValueError(
            f"weight must be ({X}, K) for {X} channels, got {tuple(weight_XK.shape)}"
        )
    if bias_X is None:
        bias_X = weight_XK.new_zeros(X)
    elif bias_X.shape != (X,):
        raise ValueError(f"bias must be ({X},), got {tuple(bias_X.shape)}")
    if seq_idx_BL is not None and seq_idx_BL.shape != (B, L):
        raise ValueError(f"seq_idx must be ({B}, {L}), got {tuple(seq_idx_BL.shape)}")
    return fla_conv_silu(xBC_BLX, weight_XK, bias_X, seq_idx_BL)
