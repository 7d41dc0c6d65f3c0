"""The real kernels on a GPU: mamba-ssm's Triton SSD and causal-conv1d against the torch
path, under compile, through ``auto``. Skipped without CUDA or without the kernels
(``torchtitan_nemotron3.ops.loader.ssd_kernels()`` / ``conv_kernels()`` say why).

Tolerances: the kernels run fp32 inputs through TF32 tensor-core dots and
accumulate bf16 in fp32, so they are compared to the exact torch path in norm."""

import logging

import pytest
import torch
from _kernel_helpers import build, mamba_args, mamba_inputs, packed_positions

from torchtitan_nemotron3.ops.loader import conv_kernels, ssd_kernels
from torchtitan_nemotron3.ops.conv_kernel import causal_conv1d_silu
from torchtitan_nemotron3.ops.kernel_ops import CudaMambaOps
from torchtitan_nemotron3.ops.ssd_kernel import mamba_ssd
from torchtitan_nemotron3.ops import TorchMambaOps

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
SSD, SSD_STATUS = ssd_kernels()
CONV, CONV_STATUS = conv_kernels()
needs_ssd = pytest.mark.skipif(SSD is None, reason=str(SSD_STATUS))
needs_conv = pytest.mark.skipif(CONV is None, reason=str(CONV_STATUS))
SCAN_ARGS = ("x_BLHP", "dt_BLH", "A_H", "B_BLGN", "C_BLGN")
TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2}


def on_cuda(inputs: dict) -> dict:
    return {k: None if v is None else v.cuda() for k, v in inputs.items()}


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def scan(ops, inp, dt_limit, chunk_size):
    names = SCAN_ARGS + ("D_H", "dt_bias_H")
    t = {n: inp[n].detach().clone().requires_grad_() for n in names}
    y = ops.scan(
        *(t[n] for n in SCAN_ARGS),
        D_H=t["D_H"],
        dt_bias_H=t["dt_bias_H"],
        dt_limit=dt_limit,
        chunk_size=chunk_size,
        seq_idx_BL=inp["seq_idx_BL"],
    )
    y.float().pow(2).sum().backward()
    return [y] + [t[n].grad for n in names]


@needs_ssd
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dt_limit", [(0.0, float("inf")), (1e-3, 0.05)])
def test_ssd_kernel_matches_torch(dtype, packed, dt_limit):
    inp = on_cuda(
        mamba_inputs(Bsz=2, L=300, H=8, P=64, G=2, N=64, dtype=dtype, packed=packed)
    )
    ours = scan(CudaMambaOps(), inp, dt_limit, 64)
    ref = scan(TorchMambaOps(), inp, dt_limit, 64)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel(a, b) <= TOL[dtype]


@needs_conv
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_conv_kernel_matches_torch(dtype, packed):
    inp = on_cuda(
        mamba_inputs(Bsz=2, L=300, H=8, P=64, G=2, N=64, dtype=dtype, packed=packed)
    )
    results = []
    for ops in (CudaMambaOps(), TorchMambaOps()):
        t = {
            n: inp[n].detach().clone().requires_grad_()
            for n in ("xBC_BLX", "weight_XK", "bias_X")
        }
        y = ops.conv(t["xBC_BLX"], t["weight_XK"], t["bias_X"], inp["seq_idx_BL"])
        y.float().pow(2).sum().backward()
        results.append([y, t["xBC_BLX"].grad, t["weight_XK"].grad, t["bias_X"].grad])
    for a, b in zip(*results):
        assert a.dtype == b.dtype and rel(a, b) <= TOL[dtype]


@needs_ssd
@needs_conv
def test_opcheck_on_cuda():
    inp = on_cuda(mamba_inputs(Bsz=1, L=100, H=4, P=32, G=1, N=32))
    seq_idx = inp["seq_idx_BL"][:1]
    ssd_args = [
        inp[n].detach().requires_grad_() for n in SCAN_ARGS + ("D_H", "dt_bias_H")
    ]
    torch.library.opcheck(mamba_ssd, (*ssd_args, seq_idx, 32, 0.0, float("inf")))
    conv_args = [
        inp[n].detach().requires_grad_() for n in ("xBC_BLX", "weight_XK", "bias_X")
    ]
    torch.library.opcheck(causal_conv1d_silu, (*conv_args, seq_idx))


@needs_ssd
@pytest.mark.parametrize("kernel_backend", ["auto", "cuda"])
def test_compiled_model_on_kernels_matches_torch(kernel_backend, caplog):
    """Every block compiled with fullgraph=True, as TorchTitan does; packed rows."""
    # no MoE: this checks the Mamba path in fp32 (CUDA grouped GEMMs are a bf16 matter)
    args = mamba_args(
        hybrid_override_pattern="M*M-", hidden_size=64, mamba_head_dim=32, chunk_size=32
    )
    if kernel_backend == "cuda" and CONV is None:
        pytest.skip(str(CONV_STATUS))
    torch.manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (2, 100)).cuda()
    positions = packed_positions(2, [30, 50, 20]).cuda()
    results = {}
    with caplog.at_level(logging.INFO):
        for backend in ("torch", kernel_backend):
            model = build(args, backend).cuda()
            for block in model.layers.values():
                block.compile(fullgraph=True)
            logits = model(tokens, positions=positions)
            logits.pow(2).mean().backward()
            results[backend] = [logits] + [
                p.grad for _, p in sorted(model.named_parameters())
            ]
    for a, b in zip(results[kernel_backend], results["torch"]):
        assert rel(a, b) <= TOL[torch.float32]
    if kernel_backend == "auto":
        assert any("SSD -> kernel" in r.getMessage() for r in caplog.records)
