"""Fixtures for the kernel-path tests: the torch references in place of the GPU
kernels, and a ``sys.modules``/``sys.path`` sandbox for fake kernel packages."""

import importlib
import sys

import pytest
import torch

from torchtitan_nemotron3.ops import loader
from reference_kernels import REFERENCE_CONV, REFERENCE_SSD, use_kernels

KERNEL_PACKAGES = ("mamba_ssm", "causal_conv1d")


def _kernel_modules() -> set[str]:
    return {
        n
        for n in sys.modules
        if any(n == p or n.startswith(p + ".") for p in KERNEL_PACKAGES)
    }


@pytest.fixture
def module_sandbox(tmp_path, monkeypatch):
    """``tmp_path`` on ``sys.path`` for fake packages; afterwards every kernel-package
    module they brought in is gone and the loader has forgotten what it found.

    Kernel-package modules imported before (with mamba-ssm installed, importing
    transformers' NemotronH tries ``import mamba_ssm``, which fails on the Mamba-1
    extension and leaves ``mamba_ssm.ops...`` children behind) are hidden from the
    test, so a fake package is not mixed with the real one, and put back after."""
    hidden = {name: sys.modules.pop(name) for name in _kernel_modules()}
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    loader.LOADED.clear()
    yield tmp_path
    for name in _kernel_modules():
        del sys.modules[name]
    sys.modules.update(hidden)
    loader.LOADED.clear()


@pytest.fixture
def reference_kernels():
    """The torch references stand in for mamba-ssm and causal-conv1d (on any device)."""
    torch._dynamo.reset()
    with use_kernels(ssd=REFERENCE_SSD, conv=REFERENCE_CONV):
        yield
    torch._dynamo.reset()
