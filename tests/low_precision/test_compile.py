"""A converted block traces whole (``fullgraph=True``, as TorchTitan compiles every
block) forward and backward, and matches eager; aot_eager (CPU inductor is not
what a GPU run uses)."""

import pytest
import torch
from lp_testing import build, debug_config

from torchtitan_nemotron3.low_precision import LowPrecisionConfig

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "lp",
    [
        LowPrecisionConfig(linear="mxfp8", experts="mxfp8", emulate=True),
        LowPrecisionConfig(linear="float8_rowwise", experts="float8_rowwise", emulate=True),
    ],
    ids=["mxfp8", "float8_rowwise"],
)
@pytest.mark.parametrize("symbol", ["M", "E"])
def test_converted_block_compiles_fullgraph(lp, symbol):
    torch._dynamo.reset()
    cfg = debug_config(lp)
    block_cfg = next(b for b in cfg.layers if b.layer_type == symbol)
    block = build(block_cfg)
    x = torch.randn(1, 64, 256, dtype=torch.bfloat16)

    def run(fn):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.float().square().mean().backward()
        grads = [p.grad.clone() for p in block.parameters() if p.grad is not None]
        block.zero_grad(set_to_none=True)
        return y.detach(), xi.grad, grads

    eager = run(block)
    compiled = run(torch.compile(block, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=0)
    torch.testing.assert_close(compiled[1], eager[1], rtol=0, atol=0)
    assert len(compiled[2]) == len(eager[2]) > 0
    for a, b in zip(compiled[2], eager[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
