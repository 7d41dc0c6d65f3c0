"""``MambaOps`` backends on the GPU kernels: ``cuda`` (kernels or an error) and ``auto``.

``CudaMambaOps`` maps the mixer's ``conv``/``scan``/``gated_norm`` onto the custom ops
of ``conv_kernel.py``/``ssd_kernel.py``/``norm_kernel.py`` with ``TorchMambaOps``'
semantics (``seq_idx`` for packed documents, ``dt_limit``, ``D`` skip, output in the
input dtype). It is strict: a missing kernel or a shape the kernel cannot take is an
error, so a benchmark or a run that asked for the kernels gets them.

``AutoMambaOps`` decides per call, conv, SSD and norm independently: kernel if the
tensors are on a device the loaded kernel runs on and the call fits it, else the
exact torch op. The SSD and the norm come from one package (mamba-ssm) and one loader
entry, so the log's "SSD" line stands for both. On CPU it never loads anything and is
exactly ``TorchMambaOps``, except under Triton's interpreter (``TRITON_INTERPRET=1``
without CUDA, ``interpret.py``), where the loaded Triton kernels take CPU tensors. It
logs once per device which path each op takes and why, and once per reason a call
falls back.

The decision is made in ``_use_kernel``, marked ``assume_constant_result``: under
``torch.compile`` Dynamo runs it once at trace time (loading the packages if
needed, logging) and bakes the boolean into the graph instead of tracing the
import machinery, so ``fullgraph=True`` holds.
"""

import torch
from torchtitan.tools.logging import logger

from . import interpret, loader, long_rows
from .conv_kernel import causal_conv1d_silu
from .fla_conv import fla_causal_conv1d_silu, fla_conv_ineligible, fla_conv_kernels
from .norm_kernel import gated_rmsnorm
from .ssd_kernel import mamba_ssd
from .torch_ops import TorchMambaOps

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Both packages compute some element offsets in 32 bits (causal-conv1d's strides are
# uint32; mamba-ssm's Triton pointer arithmetic, mamba issue #1015): past this, the
# kernels crash or silently return wrong values, so such calls stay on torch.
_OFFSET_LIMIT = 2**31


def _last_offset(t: torch.Tensor) -> int:
    """Element offset of a tensor's last element from its first (strided views count
    their full row stride, e.g. ``x`` sliced out of the ``in_proj`` output)."""
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def _too_large(largest: int) -> str:
    if largest >= _OFFSET_LIMIT:
        return f"{largest}-element offsets, past the kernels' 32-bit arithmetic"
    return ""


def conv_ineligible(xBC_BLX: torch.Tensor, weight_XK: torch.Tensor) -> str:
    """Why causal-conv1d cannot take this call ("" if it can)."""
    C, K = weight_XK.shape
    if not 2 <= K <= 4:
        return f"conv width {K} (causal-conv1d takes 2 to 4)"
    if C % 8:
        return f"{C} conv channels, not a multiple of 8"
    for t in (xBC_BLX, weight_XK):
        if t.dtype not in _KERNEL_DTYPES:
            return f"dtype {t.dtype}"
    return _too_large(max(_last_offset(xBC_BLX), xBC_BLX.numel()))


def ssd_ineligible(
    x_BLHP: torch.Tensor,
    dt_BLH: torch.Tensor,
    B_BLGN: torch.Tensor,
    C_BLGN: torch.Tensor,
    chunk_size: int,
) -> str:
    """Why mamba-ssm's SSD cannot take this call ("" if it can)."""
    if x_BLHP.dtype not in _KERNEL_DTYPES:
        return f"dtype {x_BLHP.dtype}"
    Bsz, L, H, P = x_BLHP.shape
    G, N = B_BLGN.shape[-2:]
    n_chunks = (L + chunk_size - 1) // chunk_size
    return _too_large(
        max(
            *(_last_offset(t) for t in (x_BLHP, dt_BLH, B_BLGN, C_BLGN)),
            Bsz * L * H * P,  # out, dx, dout
            Bsz * n_chunks * H * P * N,  # chunk states
            Bsz * n_chunks * G * chunk_size * chunk_size,  # C·Bᵀ per chunk
        )
    )


def norm_ineligible(
    y_BLI: torch.Tensor, z_BLI: torch.Tensor, weight_I: torch.Tensor, n_groups: int
) -> str:
    """Why mamba-ssm's gated RMSNorm kernel cannot take this call ("" if it can)."""
    I = y_BLI.shape[-1]
    if I % n_groups:
        return f"{I} channels in {n_groups} groups"
    for t in (y_BLI, z_BLI, weight_I):
        if t.dtype not in _KERNEL_DTYPES:
            return f"dtype {t.dtype}"
    group_size = I // n_groups
    if group_size * y_BLI.element_size() > 65536:
        return f"groups of {group_size} channels (the kernel takes up to 64 KB a row)"
    return _too_large(max(_last_offset(z_BLI), y_BLI.numel()))


def ssd_pieces(
    x_BLHP: torch.Tensor,
    dt_BLH: torch.Tensor,
    B_BLGN: torch.Tensor,
    C_BLGN: torch.Tensor,
    chunk_size: int,
) -> tuple[tuple[list[int], list[int]] | None, str]:
    """How mamba-ssm's SSD takes this call: ``(row_bounds, seq_bounds)`` of the pieces
    that each fit its 32-bit offsets (one piece when the call fits), or None and why
    it cannot."""
    if x_BLHP.dtype not in _KERNEL_DTYPES:
        return None, f"dtype {x_BLHP.dtype}"
    try:
        plan = long_rows.ssd_plan(
            x_BLHP, dt_BLH, B_BLGN, C_BLGN, chunk_size, long_rows.OFFSET_LIMIT
        )
        return plan, ""
    except ValueError as e:
        return None, str(e)


def _seq_idx_i32(seq_idx_BL: torch.Tensor | None) -> torch.Tensor | None:
    return None if seq_idx_BL is None else seq_idx_BL.to(torch.int32).contiguous()


class CudaMambaOps:
    """mamba-ssm's Triton SSD and gated RMSNorm, causal-conv1d's CUDA conv; errors if
    one is missing."""

    name = "cuda"

    def conv(self, xBC_BLX, weight_XK, bias_X, seq_idx_BL):
        kernel, why_not = _conv_kernel(xBC_BLX.device.type, xBC_BLX, weight_XK)
        if kernel is None:
            raise RuntimeError(f"kernel_backend='cuda': no causal conv kernel ({why_not})")
        if kernel == FLA:
            return fla_causal_conv1d_silu(xBC_BLX, weight_XK, bias_X, seq_idx_BL)
        if bias_X is None:
            bias_X = weight_XK.new_zeros(weight_XK.shape[0])
        return causal_conv1d_silu(
            xBC_BLX, weight_XK, bias_X.to(weight_XK.dtype), _seq_idx_i32(seq_idx_BL)
        )

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
        pieces, why = ssd_pieces(x_BLHP, dt_BLH, B_BLGN, C_BLGN, chunk_size)
        if pieces is None:
            raise ValueError(f"kernel_backend='cuda': the SSD kernel cannot take {why}")
        lo, hi = dt_limit
        out_BLHP, _ = mamba_ssd(
            x_BLHP,
            dt_BLH,
            A_H,
            B_BLGN,
            C_BLGN,
            D_H,
            dt_bias_H,
            _seq_idx_i32(seq_idx_BL),
            chunk_size,
            float(lo),
            float(hi),
            *pieces,
        )
        return out_BLHP

    def gated_norm(self, y_BLI, z_BLI, weight_I, *, eps, n_groups):
        why = norm_ineligible(y_BLI, z_BLI, weight_I, n_groups)
        if why:
            raise ValueError(
                f"kernel_backend='cuda': the gated RMSNorm kernel cannot take {why}"
            )
        return gated_rmsnorm(
            y_BLI, z_BLI, weight_I, float(eps), y_BLI.shape[-1] // n_groups
        )


_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.info(message)


# Where each op's kernel comes from, in order of preference: mamba-ssm brings the SSD
# and the norm; the conv is causal-conv1d's CUDA build where installed, else fla-core's
# Triton conv (no nvcc build).
CAUSAL_CONV1D, FLA = "causal-conv1d", "fla-core"
_SOURCES = {
    "conv": ((CAUSAL_CONV1D, "conv", loader.conv_kernels), (FLA, "fla_conv", fla_conv_kernels)),
    "ssd": (("mamba-ssm", "ssd", loader.ssd_kernels),),
    "norm": (("mamba-ssm", "ssd", loader.ssd_kernels),),
}


def _source_status(source, kind, load, op, device_type) -> tuple[bool, str]:
    """Whether this source's kernel for ``op`` runs on this device, and why (not).

    Off CUDA nothing is loaded: only kernels already found (e.g. stand-ins a test
    put in ``loader.LOADED``) are considered, except on CPU under Triton's
    interpreter (``interpret.active()``), where the Triton kernels run."""
    if device_type != "cuda" and kind not in loader.LOADED:
        if not (device_type == "cpu" and interpret.active()):
            return False, f"tensors on {device_type}"
    kernels, status = load()
    if kernels is None:
        return False, status.detail
    if device_type not in kernels.devices:
        return False, f"{status.name} runs on {'/'.join(sorted(kernels.devices))}"
    if op == "norm" and (kernels.norm_fwd is None or kernels.norm_bwd is None):
        return False, f"{status.name} has no gated norm kernel"
    return True, f"{status.name}: {status.detail}"


def _kernel_source(op: str, device_type: str) -> tuple[str | None, str]:
    """Which source serves ``op`` ("conv"/"ssd"/"norm") on this device, and why (not)."""
    reasons = []
    for source, kind, load in _SOURCES[op]:
        available, why = _source_status(source, kind, load, op, device_type)
        if available:
            return source, why
        reasons.append(why)
    return None, "; ".join(dict.fromkeys(reasons))


def _kernel_for(op: str, device_type: str) -> tuple[bool, str]:
    source, why = _kernel_source(op, device_type)
    return source is not None, why


def _conv_kernel(
    device_type: str, xBC_BLX: torch.Tensor, weight_XK: torch.Tensor
) -> tuple[str | None, str]:
    """The first conv kernel that runs on this device and takes this call (a call too
    large for causal-conv1d's 32-bit offsets goes to fla-core's, which splits it),
    or None and every reason why not."""
    ineligible = (conv_ineligible(xBC_BLX, weight_XK), fla_conv_ineligible(xBC_BLX, weight_XK))
    source = _conv_choice(device_type, *ineligible)
    if source:
        return source, ""
    reasons = []
    for (name, kind, load), why in zip(_SOURCES["conv"], ineligible):
        available, status = _source_status(name, kind, load, "conv", device_type)
        reasons.append(f"{name} cannot take {why}" if available else status)
    return None, "; ".join(dict.fromkeys(reasons))


@torch.compiler.assume_constant_result
def _conv_choice(device_type: str, causal_conv1d_why: str, fla_why: str) -> str:
    """The conv source to use ("" for none), from the calls' shape checks. Marked
    constant so Dynamo bakes the answer in instead of tracing the loaders."""
    for (name, kind, load), why in zip(_SOURCES["conv"], (causal_conv1d_why, fla_why)):
        if not why and _source_status(name, kind, load, "conv", device_type)[0]:
            return name
    return ""


def auto_plan(device_type: str) -> str:
    """What ``auto`` does on this device, in words (loads the kernels if on CUDA)."""
    return "; ".join(
        f"{label} -> {'kernel' if use else 'torch'} ({why})"
        for label, (use, why) in (
            ("conv", _kernel_for("conv", device_type)),
            ("SSD", _kernel_for("ssd", device_type)),
        )
    )


@torch.compiler.assume_constant_result
def _use_kernel(op: str, device_type: str, ineligible: str) -> bool:
    _log_once(f"Mamba2 ops (kernel_backend='auto', {device_type}): {auto_plan(device_type)}")
    use, why = _kernel_for(op, device_type)
    if not use and op == "norm" and _kernel_for("ssd", device_type)[0]:
        # the plan's "SSD" line said kernel: say why the norm is not
        _log_once(f"Mamba2 norm (kernel_backend='auto', {device_type}): torch ({why})")
    if use and ineligible:
        _log_once(
            f"Mamba2 {op} (kernel_backend='auto', {device_type}): torch for {ineligible}"
        )
        return False
    return use


class AutoMambaOps:
    """Per call: the kernel when the tensors are on CUDA, it loaded and the call fits it;
    otherwise the torch op. Conv, SSD and norm fall back independently."""

    name = "auto"

    def __init__(self) -> None:
        self.torch_ops = TorchMambaOps()
        self.kernel_ops = CudaMambaOps()

    def conv(self, xBC_BLX, weight_XK, bias_X, seq_idx_BL):
        device_type = xBC_BLX.device.type
        ineligible = (conv_ineligible(xBC_BLX, weight_XK), fla_conv_ineligible(xBC_BLX, weight_XK))
        why = "" if _conv_choice(device_type, *ineligible) else "; ".join(filter(None, ineligible))
        if _use_kernel("conv", device_type, why):
            return self.kernel_ops.conv(xBC_BLX, weight_XK, bias_X, seq_idx_BL)
        return self.torch_ops.conv(xBC_BLX, weight_XK, bias_X, seq_idx_BL)

    def scan(self, x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, **kwargs):
        _, why = ssd_pieces(x_BLHP, dt_BLH, B_BLGN, C_BLGN, kwargs["chunk_size"])
        ops = (
            self.kernel_ops
            if _use_kernel("ssd", x_BLHP.device.type, why)
            else self.torch_ops
        )
        return ops.scan(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, **kwargs)

    def gated_norm(self, y_BLI, z_BLI, weight_I, *, eps, n_groups):
        why = norm_ineligible(y_BLI, z_BLI, weight_I, n_groups)
        ops = (
            self.kernel_ops
            if _use_kernel("norm", y_BLI.device.type, why)
            else self.torch_ops
        )
        return ops.gated_norm(y_BLI, z_BLI, weight_I, eps=eps, n_groups=n_groups)
