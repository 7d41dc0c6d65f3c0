"""Torch stand-ins with the exact signatures of the kernels ``ops/loader.py`` finds.

``REFERENCE_SSD`` / ``REFERENCE_CONV`` compute what mamba-ssm's
``_mamba_chunk_scan_combined_fwd/_bwd`` (with its gated RMSNorm,
``layernorm_gated._layer_norm_fwd/_bwd``) and causal-conv1d's
``causal_conv1d_fwd/bwd_function`` compute, through the model's own exact torch ops
(``ops/ssd.py``, ``ops/conv.py``, ``TorchMambaOps.gated_norm``), backward by autograd.
Put in place with ``use_kernels``, they let the whole kernel path (argument mapping,
custom ops, fake tensors, autograd, compile) run and be checked on CPU, where the real
kernels cannot. Only the arguments the mixer uses are implemented; the others must
keep their defaults.
"""

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from torchtitan_nemotron3.ops import kernel_ops, loader
from torchtitan_nemotron3.ops.conv import causal_conv1d
from torchtitan_nemotron3.ops.loader import ConvKernels, KernelStatus, SSDKernels
from torchtitan_nemotron3.ops.ssd import ssd_scan
from torchtitan_nemotron3.ops.torch_ops import TorchMambaOps


def _unused(**kwargs) -> None:
    for name, value in kwargs.items():
        if value is not None:
            raise NotImplementedError(f"reference kernels do not implement {name}")


@contextlib.contextmanager
def _autograd():
    """A custom op's implementation runs below autograd (grad mode off, the Autograd
    dispatch keys excluded); the reference backwards need autograd back on."""
    excluded = torch._C._dispatch_tls_local_exclude_set().remove(
        torch._C.DispatchKey.AutogradCPU  # removes the Autograd functionality, all backends
    )
    included = torch._C._dispatch_tls_local_include_set()
    with torch._C._ForceDispatchKeyGuard(included, excluded), torch.enable_grad():
        yield


def _ssd(x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dt_softplus, dt_limit):
    y, _ = ssd_scan(
        x, dt, A, B, C, chunk_size, D_H=D, dt_bias_H=dt_bias, dt_softplus=dt_softplus,
        dt_limit=dt_limit, seq_idx_BL=seq_idx,
    )  # fmt: skip
    return y


def ssd_fwd_reference(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    seq_idx=None,
    cu_seqlens=None,
    dt_softplus=False,
    dt_limit=(0.0, float("inf")),
):
    """``(out, out_x, dt_out, dA_cumsum, states, final_states)``; only ``out`` is real."""
    _unused(z=z, initial_states=initial_states, cu_seqlens=cu_seqlens)
    with torch.no_grad():
        out = _ssd(
            x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dt_softplus, dt_limit
        )
    return out, None, None, None, None, None


def ssd_bwd_reference(
    dout,
    x,
    dt,
    A,
    B,
    C,
    out,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    dfinal_states=None,
    seq_idx=None,
    dt_softplus=False,
    dt_limit=(0.0, float("inf")),
    **unused,
):
    """``(dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states)``, in the kernel's
    dtypes: dA and ddt_bias fp32, the others like their inputs."""
    _unused(z=z, initial_states=initial_states, dfinal_states=dfinal_states)
    leaves = [t.detach().requires_grad_() for t in (x, dt, A, B, C, D, dt_bias)]
    with _autograd():
        y = _ssd(
            *leaves[:5],
            chunk_size,
            leaves[5],
            leaves[6],
            seq_idx,
            dt_softplus,
            dt_limit,
        )
        dx, ddt, dA, dB, dC, dD, ddt_bias = torch.autograd.grad(y, leaves, dout)
    return dx, ddt, dA.float(), dB, dC, dD, None, ddt_bias.float(), None


def _gated_norm(x, weight, z, eps, group_size):
    return TorchMambaOps().gated_norm(
        x, z, weight, eps=eps, n_groups=x.shape[-1] // group_size
    ).to(x.dtype)


def _norm_args(bias, norm_before_gate, is_rms_norm, z, group_size):
    _unused(bias=bias)
    if norm_before_gate or not is_rms_norm or z is None or group_size is None:
        raise NotImplementedError("reference norm: gated RMSNorm, gate first, groups only")


def norm_fwd_reference(
    x,
    weight,
    bias,
    eps,
    z=None,
    out=None,
    group_size=None,
    norm_before_gate=True,
    is_rms_norm=False,
):
    """``(out, mean, rstd)`` for 2-D ``x`` (M, N); ``rstd`` is (groups·M,), group-major."""
    _norm_args(bias, norm_before_gate, is_rms_norm, z, group_size)
    _unused(out=out)
    with torch.no_grad():
        h = (x.float() * F.silu(z.float())).unflatten(-1, (-1, group_size))
        rstd = torch.rsqrt(h.pow(2).mean(-1) + eps).T.reshape(-1)
        return _gated_norm(x, weight, z, eps, group_size), None, rstd


def norm_bwd_reference(
    dy,
    x,
    weight,
    bias,
    eps,
    mean,
    rstd,
    z=None,
    group_size=None,
    norm_before_gate=True,
    is_rms_norm=False,
    recompute_output=False,
    dz=None,
    out=None,
):
    """``(dx, dw, db, dz)``, each like its input."""
    _norm_args(bias, norm_before_gate, is_rms_norm, z, group_size)
    _unused(dz=dz, out=out, recompute_output=recompute_output or None)
    leaves = [t.detach().requires_grad_() for t in (x, weight, z)]
    with _autograd():
        y = _gated_norm(leaves[0], leaves[1], leaves[2], eps, group_size)
        dx, dw, dz = torch.autograd.grad(y, leaves, dy)
    return dx, dw, None, dz


def _conv(x_BXL, weight, bias, seq_idx, silu):
    # The kernel accumulates in fp32 and writes the input dtype.
    y_BLX = causal_conv1d(
        x_BXL.transpose(1, 2).float(),
        weight.float(),
        None if bias is None else bias.float(),
        seq_idx,
    )
    if silu:
        y_BLX = F.silu(y_BLX)
    return y_BLX.to(x_BXL.dtype).transpose(1, 2)


def conv_fwd_reference(
    x, weight, bias, seq_idx, initial_states, final_states_out, silu_activation
):
    _unused(initial_states=initial_states, final_states_out=final_states_out)
    with torch.no_grad():
        return _conv(x, weight, bias, seq_idx, silu_activation)


def conv_bwd_reference(
    x,
    weight,
    bias,
    dout,
    seq_idx,
    initial_states,
    dfinal_states,
    dx,
    return_dinitial_states,
    silu_activation,
):
    _unused(initial_states=initial_states, dfinal_states=dfinal_states, dx=dx)
    leaves = [
        t.detach().requires_grad_()
        for t in (x, weight) + ((bias,) if bias is not None else ())
    ]
    with _autograd():
        y = _conv(
            leaves[0],
            leaves[1],
            leaves[2] if bias is not None else None,
            seq_idx,
            silu_activation,
        )
        grads = torch.autograd.grad(y, leaves, dout)
    dbias = grads[2] if bias is not None else None
    return grads[0], grads[1], dbias, None


_ANY_DEVICE = frozenset({"cpu", "cuda"})

REFERENCE_SSD = SSDKernels(
    fwd=ssd_fwd_reference,
    bwd=ssd_bwd_reference,
    status=KernelStatus("reference SSD", True, "torch stand-in (tests/kernels/reference_kernels.py)"),
    norm_fwd=norm_fwd_reference,
    norm_bwd=norm_bwd_reference,
    devices=_ANY_DEVICE,
)
REFERENCE_CONV = ConvKernels(
    fwd=conv_fwd_reference,
    bwd=conv_bwd_reference,
    status=KernelStatus(
        "reference conv", True, "torch stand-in (tests/kernels/reference_kernels.py)"
    ),
    devices=_ANY_DEVICE,
)


_UNSET = object()


@contextlib.contextmanager
def use_kernels(ssd=_UNSET, conv=_UNSET) -> Iterator[None]:
    """Inside the block the loader reports these kernels (``SSDKernels``/``ConvKernels``,
    or ``None`` for "unavailable") as what it found; ``conv`` stands for causal-conv1d,
    and fla-core's conv is then reported unavailable. Compiled graphs keep the choice
    they were traced with: reset Dynamo around compiled code that should see it."""
    saved = dict(loader.LOADED)
    fla = _UNSET if conv is _UNSET else None
    for kind, kernels in (("ssd", ssd), ("conv", conv), ("fla_conv", fla)):
        if kernels is not _UNSET:
            status = kernels.status if kernels else KernelStatus(kind, False, "disabled by test")
            loader.LOADED[kind] = (kernels, status)
    kernel_ops._LOGGED.clear()
    try:
        yield
    finally:
        loader.LOADED.clear()
        loader.LOADED.update(saved)
        kernel_ops._LOGGED.clear()
