"""The gated RMSNorm as a kernel op (``ops/norm_kernel.py``) and the third ``MambaOps``
method, ``gated_norm``, with the torch stand-in of mamba-ssm's ``_layer_norm_fwd/_bwd``
(``reference_kernels.py``) on CPU. The real kernel against torch: ``test_interpret.py``
(Triton's interpreter) and ``test_kernel_cuda.py``."""

import dataclasses
import logging

import pytest
import torch
from reference_kernels import REFERENCE_SSD, use_kernels

from torchtitan_nemotron3.model.mamba2 import GatedGroupRMSNorm
from torchtitan_nemotron3.ops import CudaMambaOps, TorchMambaOps, mamba_ops
from torchtitan_nemotron3.ops.kernel_ops import norm_ineligible
from torchtitan_nemotron3.ops.norm_kernel import (
    gated_rmsnorm_backward,
    gated_rmsnorm_fwd,
)


def norm_inputs(dtype=torch.float32, Bsz=2, L=10, I=32, extra=12):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(Bsz, L, I, generator=g).to(dtype)
    zx = torch.randn(Bsz, L, I + extra, generator=g).to(dtype)  # z = zx[..., :I]
    weight = (1 + 0.3 * torch.randn(I, generator=g)).to(dtype)
    return y, zx, weight


def run(ops, y, zx, weight, n_groups):
    y, zx, weight = (t.clone().requires_grad_() for t in (y, zx, weight))
    out = ops.gated_norm(y, zx[..., : y.shape[-1]], weight, eps=1e-5, n_groups=n_groups)
    out.float().pow(2).sum().backward()
    return [out, y.grad, zx.grad, weight.grad]


def test_the_module_keeps_its_weight_and_the_torch_math():
    norm = GatedGroupRMSNorm(GatedGroupRMSNorm.Config(dim=32, n_groups=4))
    norm.reset_parameters()
    assert [n for n, _ in norm.named_parameters()] == ["weight"]
    y, zx, _ = norm_inputs()
    z = zx[..., :32]
    h = (y * torch.nn.functional.silu(z)).unflatten(-1, (4, 8))
    expected = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).flatten(-2)
    torch.testing.assert_close(norm(y, z), expected)
    assert torch.equal(
        norm(y, z), TorchMambaOps().gated_norm(y, z, norm.weight, eps=1e-5, n_groups=4)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_op_matches_torch(reference_kernels, dtype):
    inputs = norm_inputs(dtype)
    ours = run(CudaMambaOps(), *inputs, n_groups=2)
    ref = run(TorchMambaOps(), *inputs, n_groups=2)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_opcheck(reference_kernels):
    y, zx, w = norm_inputs(Bsz=1, L=5, I=16, extra=8)
    zx.requires_grad_()
    args = (y.requires_grad_(), zx[..., :16], w.requires_grad_(), 1e-5, 8)
    torch.library.opcheck(gated_rmsnorm_fwd, args)
    _out, rstd = gated_rmsnorm_fwd(*[a.detach() if torch.is_tensor(a) else a for a in args])
    assert rstd.shape == (2 * 5,) and rstd.dtype == torch.float32
    dout = torch.randn(y.shape)
    torch.library.opcheck(
        gated_rmsnorm_backward,
        (dout, y.detach(), args[1].detach(), w.detach(), rstd, 1e-5, 8),
    )


def test_the_cuda_backend_is_strict():
    y, zx, w = norm_inputs()
    z = zx[..., :32]
    cuda = CudaMambaOps()
    with use_kernels(ssd=None):
        with pytest.raises(RuntimeError, match="the gated RMSNorm kernel is not usable"):
            cuda.gated_norm(y, z, w, eps=1e-5, n_groups=2)
    with use_kernels(ssd=dataclasses.replace(REFERENCE_SSD, norm_fwd=None)):
        with pytest.raises(RuntimeError, match="has no gated norm kernel"):
            cuda.gated_norm(y, z, w, eps=1e-5, n_groups=2)
    with use_kernels(ssd=REFERENCE_SSD):
        with pytest.raises(ValueError, match="dtype torch.float64"):
            cuda.gated_norm(y.double(), z.double(), w.double(), eps=1e-5, n_groups=2)


def test_ineligible_calls():
    y, zx, w = norm_inputs()
    z = zx[..., :32]
    assert norm_ineligible(y, z, w, 2) == ""
    assert norm_ineligible(y, z, w, 3) == "32 channels in 3 groups"
    assert norm_ineligible(y.double(), z, w, 2) == "dtype torch.float64"
    wide = torch.empty(1, 1, 40000, device="meta")
    assert "64 KB" in norm_ineligible(wide, wide, wide[0, 0], 1)


def test_auto_takes_the_norm_kernel_with_the_ssd_and_falls_back_alone(caplog):
    calls = []

    def counted(fn):
        def inner(*args, **kwargs):
            calls.append("norm")
            return fn(*args, **kwargs)

        return inner

    inputs = norm_inputs()
    auto = mamba_ops("auto")
    ssd = dataclasses.replace(REFERENCE_SSD, norm_fwd=counted(REFERENCE_SSD.norm_fwd))
    with use_kernels(ssd=ssd):
        run(auto, *inputs, n_groups=2)
        run(auto, *[t.double() for t in inputs], n_groups=2)  # fp64: torch
    assert calls == ["norm"]
    no_norm = dataclasses.replace(REFERENCE_SSD, norm_fwd=None, norm_bwd=None)
    with use_kernels(ssd=no_norm), caplog.at_level(logging.INFO):
        ours = run(auto, *inputs, n_groups=2)
    ref = run(TorchMambaOps(), *inputs, n_groups=2)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    assert (
        "Mamba2 norm (kernel_backend='auto', cpu): torch (reference SSD has no gated "
        "norm kernel)" in [r.getMessage() for r in caplog.records]
    )


@pytest.mark.integration  # compiles
def test_compiles_fullgraph_as_one_op(reference_kernels):
    graphs = []

    def recording(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    class Compiled:
        """``CudaMambaOps.gated_norm`` under ``torch.compile(fullgraph=True)``."""

        fn = staticmethod(
            torch.compile(CudaMambaOps().gated_norm, fullgraph=True, backend=recording)
        )

        def gated_norm(self, y, z, weight, *, eps, n_groups):
            return self.fn(y, z, weight, eps=eps, n_groups=n_groups)

    inputs = norm_inputs()
    ours = run(Compiled(), *inputs, n_groups=2)
    ref = run(TorchMambaOps(), *inputs, n_groups=2)
    assert len(graphs) == 1 and "nemotron3.gated_rmsnorm_fwd.default" in graphs[0]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
