"""One GEMM at a time, in bf16, against the same GEMM unquantized: forward, input
gradient and weight gradient SQNR (torchao's ``compute_error``). Runs torch's real
CPU ``_scaled_mm`` for FP8 rowwise Linears, torchao's emulated MXFP8 kernels, and
our FP8 rowwise grouped-GEMM emulation (checked against torchao's own reference
quantizers)."""

import pytest
import torch
from torchao.float8.config import ScalingGranularity
from torchao.float8.float8_utils import compute_error, tensor_to_scale, to_fp8_saturated
from torchao.prototype.moe_training import utils as ao_utils
from torchao.prototype.moe_training.config import MXFP8TrainingOpConfig, MXFP8TrainingRecipe
from torchao.prototype.moe_training.ep.kernels import generate_permute_indices
from torchtitan.models.common.linear import Linear

from torchtitan_nemotron3.low_precision.dispatch import padded_permute_indices
from torchtitan_nemotron3.low_precision.fp8_grouped import (
    FP8,
    emulated_float8_rowwise_grouped_mm,
)
from torchtitan_nemotron3.low_precision.linear import NemotronHLinearConverter

D, F, M = 256, 512, 256


def _fwd_bwd(module_or_fn, x, w):
    x = x.detach().clone().requires_grad_()
    y = module_or_fn(x)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype))
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("recipe", ["float8_rowwise", "float8_rowwise_gw_hp", "mxfp8"])
def test_linear_sqnr_against_bf16(recipe):
    torch.manual_seed(0)
    x = torch.randn(M, D, dtype=torch.bfloat16)
    w = torch.randn(F, D) * D**-0.5
    converter = NemotronHLinearConverter.Config(recipe=recipe, emulate=True).build()
    quantized = converter._new(Linear.Config(in_features=D, out_features=F)).build()
    plain = torch.nn.Linear(D, F, bias=False)
    for m in (quantized, plain):
        m.weight = torch.nn.Parameter(w.to(torch.bfloat16).clone())
    ref = _fwd_bwd(plain, x, plain.weight)
    got = _fwd_bwd(quantized, x, quantized.weight)
    sqnr = [compute_error(r.float(), g.float()).item() for r, g in zip(ref, got)]
    assert min(sqnr) >= 25, sqnr
    quantized_grads = sqnr if recipe != "float8_rowwise_gw_hp" else sqnr[:2]
    assert max(quantized_grads) < 45, f"{sqnr}: not quantized?"
    if recipe == "float8_rowwise_gw_hp":
        assert sqnr[2] > 45, f"{sqnr}: the weight gradient should be high precision"


def _groups():
    offs = torch.tensor([64, 96, 192, 256], dtype=torch.int32)  # 32-aligned, uneven
    torch.manual_seed(1)
    A = torch.randn(256, D, dtype=torch.bfloat16)
    W = (torch.randn(4, F, D) * D**-0.5).to(torch.bfloat16)
    return A, W, offs


@pytest.mark.parametrize("kind", ["mxfp8_emulated", "float8_rowwise_emulated"])
def test_grouped_mm_sqnr_against_bf16(kind):
    A, W, offs = _groups()
    w_ref = W.clone().requires_grad_()
    w_q = W.clone().requires_grad_()
    ref = _fwd_bwd(lambda a: torch._grouped_mm(a, w_ref.transpose(-2, -1), offs=offs), A, w_ref)
    if kind == "mxfp8_emulated":
        cfg = MXFP8TrainingOpConfig.from_recipe(MXFP8TrainingRecipe.MXFP8_EMULATED_RCEIL)

        def fn(a):
            return ao_utils._quantize_then_scaled_grouped_mm(
                a, w_q.transpose(-2, -1), config=cfg, offs=offs
            )
    else:

        def fn(a):
            return emulated_float8_rowwise_grouped_mm(a, w_q.transpose(-2, -1), offs)

    got = _fwd_bwd(fn, A, w_q)
    sqnr = [compute_error(r.float(), g.float()).item() for r, g in zip(ref, got)]
    assert min(sqnr) >= 24, sqnr
    assert max(sqnr) < 45, f"{sqnr}: not quantized?"


def test_fp8_emulation_rounds_as_torchaos_reference_quantizers(monkeypatch):
    """Our emulation's rounded operands equal what torchao's torch-reference FP8
    quantizers give (same scales, same axes): A per row (forward), B per (expert,
    K) over N (input grad), A per (group, column) over the group's tokens (weight
    grad)."""
    import torchtitan_nemotron3.low_precision.fp8_grouped as fg

    A, W, offs = _groups()
    mm_calls, wgrad_calls = [], []

    def mm(a, b, o):
        mm_calls.append((a.clone(), b.clone()))
        return torch._grouped_mm(a, b, offs=o)

    def wgrad(a, b, o):
        wgrad_calls.append((a.clone(), b.clone()))
        return torch._grouped_mm(a.t(), b, offs=o)

    monkeypatch.setattr(fg, "grouped_mm", mm)
    monkeypatch.setattr(fg, "grouped_mm_wgrad", wgrad)
    w = W.clone().requires_grad_()
    y = emulated_float8_rowwise_grouped_mm(A.clone().requires_grad_(), w.transpose(-2, -1), offs)
    y.backward(torch.randn_like(y))

    def dequant(q, scale):
        return q.float() / scale

    scale = tensor_to_scale(
        A, FP8, scaling_granularity=ScalingGranularity.AXISWISE, axiswise_dim=-1,
        round_scales_to_power_of_2=True,
    )  # fmt: skip
    assert torch.equal(mm_calls[0][0], dequant(to_fp8_saturated(A.float() * scale, FP8), scale))
    B_q, B_scales = ao_utils.torch_to_3d_rowwise_float8_transpose_rhs(
        W.transpose(-2, -1), FP8, round_scales_to_power_of_2=True
    )  # (E, N, K), scales (E, 1, K)
    assert torch.equal(mm_calls[1][1], dequant(B_q, B_scales))
    A_q, A_scales = ao_utils.torch_to_float8_per_group_colwise(
        A, offs, FP8, round_scales_to_power_of_2=True
    )
    starts = [0, *offs.tolist()[:-1]]
    for g, (s, e) in enumerate(zip(starts, offs.tolist())):
        group_scale = A_scales[g * D : (g + 1) * D]
        assert torch.equal(wgrad_calls[0][0][s:e], dequant(A_q[s:e], group_scale))


@pytest.mark.parametrize("ranks,experts,align", [(1, 8, 32), (2, 4, 16), (3, 5, 128)])
def test_padded_permute_indices_equal_torchaos(ranks, experts, align):
    g = torch.Generator().manual_seed(ranks)
    for trial in range(4):
        counts = torch.randint(0, 40, (ranks * experts,), generator=g)
        counts[trial] = 0
        n = int(counts.sum())
        max_len = (n + experts * align + align - 1) // align * align
        want, sizes, _ = generate_permute_indices(
            counts, experts, ranks, max_len, align, use_cpu=True
        )
        got, got_sizes = padded_permute_indices(counts, experts, ranks, max_len, align)
        assert torch.equal(got, want) and torch.equal(got_sizes, sizes.int())
