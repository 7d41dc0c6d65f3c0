"""Find mamba-ssm's Triton SSD (+ gated norm) and causal-conv1d's CUDA conv without importing what is missing.

Two facts about the GPU packages (as installed from PyPI, mamba-ssm 2.3.2.post1 and causal-conv1d 1.7.0) shape this module:

* ``import mamba_ssm.ops.triton.ssd_combined`` first executes ``mamba_ssm/__init__.py``,
  which imports the compiled Mamba-1 extension ``selective_scan_cuda``. An install
  built with ``MAMBA_SKIP_CUDA_BUILD=TRUE`` (the quick one: no nvcc, minutes instead
  of half an hour) has no such extension, yet everything Mamba2 needs (the SSD and
  the gated RMSNorm) is pure Triton. When the package's own ``__init__`` fails, we
  register a *bare* package module in its place: same name, same ``__path__``, no
  ``__init__`` code run. Submodules then import normally. Whatever the failed
  attempt left behind (``mamba_ssm.ops``, ``mamba_ssm.utils.torch``: children whose
  parent import failed) is removed first, so ``sys.modules`` never holds orphans.
* ``causal_conv1d`` imports its CUDA extension ``causal_conv1d_cuda`` at import time.
  We ask ``importlib.util.find_spec`` (which runs no package code) whether the
  package and the extension exist before importing anything.

Nothing is loaded when this module is imported: ``ssd_kernels()`` / ``conv_kernels()``
load on first use (the ``auto`` backend asks only once a tensor is on CUDA, or on
CPU under Triton's interpreter) and cache the outcome, available or the reason why not.

Under ``TRITON_INTERPRET=1`` without CUDA (``interpret.active()``), mamba-ssm's
Triton kernels run on CPU tensors: the loader lets ``interpret.prepare`` neutralise
their GPU-only host code and marks them as running on ``cpu`` too.

What was found is cached in ``LOADED``; the tests seed it with torch stand-ins of
the same signatures to run the kernel path, custom ops and all, on CPU.
"""

import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

from . import interpret

MAMBA_SSM = "mamba_ssm"
CAUSAL_CONV1D = "causal_conv1d"
CAUSAL_CONV1D_EXTENSION = "causal_conv1d_cuda"
# Set on a bare package module we registered, with the reason the normal import failed.
BARE_PACKAGE_ATTR = "__nemotron3_bare_package__"


class KernelUnavailable(ImportError):
    """A kernel package cannot be used; the message says why, in a few words."""


@dataclass(frozen=True)
class KernelStatus:
    """Outcome of loading one kernel family: where it came from, or why it is absent."""

    name: str
    available: bool
    detail: str

    def __str__(self) -> str:
        state = "available" if self.available else "unavailable"
        return f"{self.name}: {state}: {self.detail}"


@dataclass(frozen=True)
class SSDKernels:
    """mamba-ssm's chunked-scan entry points, with their exact signatures:

    ``fwd(x, dt, A, B, C, chunk_size, D=, z=, dt_bias=, initial_states=, seq_idx=,
    cu_seqlens=, dt_softplus=, dt_limit=)`` → ``(out, ...)``;
    ``bwd(dout, x, dt, A, B, C, out, chunk_size, D=, z=, dt_bias=, initial_states=,
    dfinal_states=, seq_idx=, dt_softplus=, dt_limit=)`` →
    ``(dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states)``.

    With them, the same package's gated (group) norm on 2-D ``x`` (M, N), from
    ``mamba_ssm.ops.triton.layernorm_gated`` (``None`` when absent):
    ``norm_fwd(x, weight, bias, eps, z=, out=, group_size=, norm_before_gate=,
    is_rms_norm=)`` → ``(out, mean, rstd)``;
    ``norm_bwd(dy, x, weight, bias, eps, mean, rstd, z=, group_size=,
    norm_before_gate=, is_rms_norm=)`` → ``(dx, dw, db, dz)``.
    """

    fwd: Callable
    bwd: Callable
    status: KernelStatus
    norm_fwd: Callable | None = None
    norm_bwd: Callable | None = None
    devices: frozenset[str] = field(default_factory=lambda: frozenset({"cuda"}))


@dataclass(frozen=True)
class ConvKernels:
    """causal-conv1d's functions, with their exact signatures (``x`` is (B, X, L)):

    ``fwd(x, weight, bias, seq_idx, initial_states, final_states_out, silu_activation)``
    → ``out``; ``bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx,
    return_dinitial_states, silu_activation)`` → ``(dx, dweight, dbias, dinitial_states)``.
    """

    fwd: Callable
    bwd: Callable
    status: KernelStatus
    devices: frozenset[str] = field(default_factory=lambda: frozenset({"cuda"}))


def _package_modules(package: str) -> set[str]:
    return {n for n in sys.modules if n == package or n.startswith(package + ".")}


def _forget(names: set[str]) -> None:
    for name in names:
        sys.modules.pop(name, None)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def _register_bare_package(
    package: str, spec: importlib.machinery.ModuleSpec, why: str
):
    """Put a module named ``package`` in ``sys.modules`` that is a package (it has the
    installed ``__path__``) but ran none of ``package/__init__.py``."""
    bare_spec = importlib.machinery.ModuleSpec(
        package, loader=None, origin=spec.origin, is_package=True
    )
    bare_spec.submodule_search_locations = list(spec.submodule_search_locations or [])
    module = importlib.util.module_from_spec(bare_spec)
    setattr(module, BARE_PACKAGE_ATTR, why)
    module.__version__ = _version(package.replace("_", "-"))
    sys.modules[package] = module
    return module


def import_bypassing_init(package: str, submodule: str) -> tuple[ModuleType, str]:
    """Import ``package.submodule``; if ``package/__init__.py`` itself fails, import it
    through a bare package instead. Returns the module and how the package was loaded.

    Raises ``KernelUnavailable`` when the package is not installed or the submodule
    cannot be imported either way, leaving no bare package or orphaned child behind.
    """
    full_name = f"{package}.{submodule}"
    existing = sys.modules.get(package)
    if existing is not None:
        how = "bare package" if hasattr(existing, BARE_PACKAGE_ATTR) else "package"
        try:
            return importlib.import_module(full_name), how
        except Exception as e:
            raise KernelUnavailable(f"import {full_name} failed: {e}") from e

    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError) as e:
        raise KernelUnavailable(f"{package} cannot be located: {e}") from e
    if spec is None or spec.submodule_search_locations is None:
        raise KernelUnavailable(f"{package.replace('_', '-')} not installed")

    try:
        importlib.import_module(package)
        how, bare = "package", False
    except Exception as e:  # noqa: BLE001 - typically the missing Mamba-1 extension
        # Children imported before the failure would be orphans: forget them all
        # (none can be in use, their package never finished importing).
        _forget(_package_modules(package))
        why = f"import {package} failed: {e}"
        _register_bare_package(package, spec, why)
        how, bare = f"bare package ({why})", True
    try:
        return importlib.import_module(full_name), how
    except Exception as e:
        if bare:  # leave no trace of the bare package and its children
            _forget(_package_modules(package))
        raise KernelUnavailable(f"import {full_name} failed: {e}") from e


def _load_ssd(package: str = MAMBA_SSM) -> tuple[SSDKernels | None, KernelStatus]:
    name = "mamba-ssm Triton SSD"
    try:
        ssd, how = import_bypassing_init(package, "ops.triton.ssd_combined")
    except KernelUnavailable as e:
        return None, KernelStatus(name, False, str(e))
    fwd = getattr(ssd, "_mamba_chunk_scan_combined_fwd", None)
    bwd = getattr(ssd, "_mamba_chunk_scan_combined_bwd", None)
    version = getattr(sys.modules[package], "__version__", "unknown version")
    if fwd is None or bwd is None:
        return None, KernelStatus(
            name,
            False,
            f"{package} {version} lacks _mamba_chunk_scan_combined_fwd/_bwd "
            "(written against mamba-ssm 2.3.2.post1)",
        )
    try:
        norm, _ = import_bypassing_init(package, "ops.triton.layernorm_gated")
    except KernelUnavailable:
        norm = None
    detail = f"{package} {version}, imported as {how}"
    devices = {"cuda"}
    if interpret.active():
        why_not = interpret.prepare(f"{package}.ops.triton.")
        if why_not:
            detail += f"; not on CPU: {why_not}"
        else:
            devices.add("cpu")
            detail += "; on CPU tensors through Triton's interpreter"
    status = KernelStatus(name, True, detail)
    kernels = SSDKernels(
        fwd=fwd,
        bwd=bwd,
        status=status,
        norm_fwd=getattr(norm, "_layer_norm_fwd", None),
        norm_bwd=getattr(norm, "_layer_norm_bwd", None),
        devices=frozenset(devices),
    )
    return kernels, status


def _load_conv(
    package: str = CAUSAL_CONV1D, extension: str = CAUSAL_CONV1D_EXTENSION
) -> tuple[ConvKernels | None, KernelStatus]:
    name = "causal-conv1d CUDA conv"
    distribution = package.replace("_", "-")
    if package not in sys.modules:
        try:
            found = importlib.util.find_spec(package) is not None
            has_extension = importlib.util.find_spec(extension) is not None
        except (ImportError, ValueError) as e:
            return None, KernelStatus(name, False, f"{package} cannot be located: {e}")
        if not found:
            return None, KernelStatus(name, False, f"{distribution} not installed")
        if not has_extension:
            return None, KernelStatus(
                name,
                False,
                f"{distribution}'s CUDA extension {extension} is missing "
                "(installed with CAUSAL_CONV1D_SKIP_CUDA_BUILD?)",
            )
    before = _package_modules(package)
    try:
        cpp = importlib.import_module(f"{package}.cpp_functions")
    except Exception as e:  # noqa: BLE001 - e.g. an extension built for another torch
        _forget(_package_modules(package) - before)
        return None, KernelStatus(name, False, f"import {package} failed: {e}")
    fwd = getattr(cpp, "causal_conv1d_fwd_function", None)
    bwd = getattr(cpp, "causal_conv1d_bwd_function", None)
    if fwd is None or bwd is None:
        return None, KernelStatus(
            name,
            False,
            f"{package} lacks causal_conv1d_fwd/bwd_function "
            "(written against causal-conv1d 1.7.0)",
        )
    status = KernelStatus(name, True, f"{package} {_version(distribution)}")
    return ConvKernels(fwd=fwd, bwd=bwd, status=status), status


# What ``ssd_kernels``/``conv_kernels`` found, by kind ("ssd", "conv"): a
# ``(kernels or None, KernelStatus)`` pair, filled on first use. Tests put torch
# stand-ins here to run the kernel path on CPU (``tests/kernels/reference_kernels.py``).
LOADED: dict[str, tuple] = {}


def ssd_kernels() -> tuple[SSDKernels | None, KernelStatus]:
    """mamba-ssm's SSD, loaded on first call and cached."""
    if "ssd" not in LOADED:
        LOADED["ssd"] = _load_ssd()
    return LOADED["ssd"]


def conv_kernels() -> tuple[ConvKernels | None, KernelStatus]:
    """causal-conv1d's conv, loaded on first call and cached."""
    if "conv" not in LOADED:
        LOADED["conv"] = _load_conv()
    return LOADED["conv"]
