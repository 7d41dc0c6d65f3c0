"""The debug model in FP8 rowwise / MXFP8 (emulated on CPU) against BF16 and fp32:
loss at init, logits SQNR, gradient cosine, and 8 AdamW steps on one batch."""

import pytest
import torch
import torch.nn.functional as F
from lp_testing import build, debug_config
from torchao.float8.float8_utils import compute_error

from torchtitan_nemotron3.low_precision import LowPrecisionConfig

pytestmark = pytest.mark.integration

RECIPES = {
    "mxfp8": LowPrecisionConfig(linear="mxfp8", experts="mxfp8", emulate=True),
    "float8_rowwise": LowPrecisionConfig(
        linear="float8_rowwise", experts="float8_rowwise", emulate=True
    ),
}
EXCLUDED = ("router.gate", "dt_bias")  # noisy even in bf16 (docs/research/fp8_2026_12.md)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 2048, (2, 256), generator=g), torch.randint(0, 2048, (2, 256), generator=g)


def _model(lp, dtype):
    return build(debug_config(lp), dtype=dtype, seed=0)


def _loss_logits_grads(model, batch):
    ids, labels = batch
    logits = model(ids)
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    loss.backward()
    grads = torch.cat(
        [p.grad.float().flatten() for n, p in model.named_parameters()
         if p.grad is not None and not any(x in n for x in EXCLUDED)]
    )  # fmt: skip
    return loss.item(), logits.detach().float(), grads


@pytest.fixture(scope="module")
def references(batch):
    return {
        dtype: _loss_logits_grads(_model(None, dtype), batch)
        for dtype in (torch.float32, torch.bfloat16)
    }


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_debug_model_at_init_close_to_bf16_and_fp32(recipe, batch, references):
    loss, logits, grads = _loss_logits_grads(_model(RECIPES[recipe], torch.bfloat16), batch)
    loss_fp32, logits_fp32, grads_fp32 = references[torch.float32]
    loss_bf16, _, _ = references[torch.bfloat16]
    assert abs(loss - loss_bf16) / loss_bf16 < 0.005, (loss, loss_bf16)
    sqnr = compute_error(logits_fp32, logits).item()
    cosine = F.cosine_similarity(grads.double(), grads_fp32.double(), dim=0).item()
    assert sqnr >= 15, sqnr
    assert cosine >= 0.97, cosine
    # and it is quantized: farther from fp32 than BF16 is
    assert sqnr < compute_error(logits_fp32, references[torch.bfloat16][1]).item()


def _train(lp, batch, steps=8):
    model = _model(lp, torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids, labels = batch
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(ids).float().flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def bf16_losses(batch):
    return _train(None, batch)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_debug_model_trains_like_bf16(recipe, batch, bf16_losses):
    losses = _train(RECIPES[recipe], batch)
    rel = [abs(a - b) / b for a, b in zip(losses, bf16_losses)]
    assert max(rel) < 0.10, (losses, bf16_losses)
    assert rel[-1] < 0.05, (losses, bf16_losses)
    assert losses[-1] < 0.5 * losses[0]  # it learns
