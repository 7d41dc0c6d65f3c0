"""A Mamba2 block compiles with ``fullgraph=True`` (as TorchTitan compiles every block)
around the kernel custom ops, and the compiled block matches eager, gradients too.

The torch references stand in for the kernels, so this runs on CPU; Inductor
generates C++ for everything around the opaque ops."""

import pytest
import torch
from _kernel_helpers import build, mamba_args, mamba_inputs

from torchtitan_nemotron3.model.pattern import MAMBA

pytestmark = pytest.mark.integration  # compiles


def mamba_block(backend: str, seed: int = 0):
    model = build(mamba_args(hybrid_override_pattern="M"), backend, seed=seed)
    block = model.layers["0"]
    assert block.layer_type == MAMBA
    return block


def fwd_bwd(fn, block, h_BLD, seq_idx_BL):
    h_BLD = h_BLD.detach().requires_grad_()
    out = fn(h_BLD, seq_idx_BL)
    out.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad(set_to_none=True)
    return out.detach(), h_BLD.grad, grads


def graph_ops(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("backend", ["cuda", "auto"])
def test_block_compiles_fullgraph_and_matches_eager(reference_kernels, backend):
    """``cuda``: the custom ops inside the compiled graph; ``auto`` on CPU with the
    stand-ins (which run on CPU) takes the same kernel path, chosen at trace time."""
    block = mamba_block(backend)
    seq_idx_BL = mamba_inputs(L=40)["seq_idx_BL"]
    h_BLD = torch.randn(2, 40, 32)
    eager = fwd_bwd(block, block, h_BLD, seq_idx_BL)

    graphs = []

    def inductor_recording(gm, example_inputs):
        graphs.append(gm)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    compiled = torch.compile(block, fullgraph=True, backend=inductor_recording)
    for _ in range(2):  # the second call reuses the compiled code
        out, h_grad, grads = fwd_bwd(compiled, block, h_BLD, seq_idx_BL)
    assert len(graphs) == 1
    assert {
        "nemotron3.mamba_ssd.default",
        "nemotron3.causal_conv1d_silu.default",
    } <= graph_ops(graphs[0])
    torch.testing.assert_close(out, eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_grad, eager[1], rtol=1e-5, atol=1e-5)
    for name, g in eager[2].items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_auto_block_on_cpu_compiles_the_torch_path():
    """No kernels: ``auto`` compiles to the plain torch SSD and conv, no custom op."""
    torch._dynamo.reset()
    block = mamba_block("auto")
    seq_idx_BL = mamba_inputs(L=40)["seq_idx_BL"]
    h_BLD = torch.randn(2, 40, 32)
    eager = fwd_bwd(block, block, h_BLD, seq_idx_BL)
    graphs = []

    def aot_eager_recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(block, fullgraph=True, backend=aot_eager_recording)
    out, h_grad, _ = fwd_bwd(compiled, block, h_BLD, seq_idx_BL)
    assert not any("nemotron3" in t for t in graph_ops(graphs[0]))
    torch.testing.assert_close(out, eager[0])
    torch.testing.assert_close(h_grad, eager[1])
