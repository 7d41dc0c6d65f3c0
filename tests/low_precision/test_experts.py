"""The routed experts really run quantized: a spy on torchao's
``_quantize_then_scaled_grouped_mm`` (the one entry point of its FP8 and MXFP8
grouped GEMMs) counts the calls of one MoE layer's forward."""

import pytest
import torch
from lp_testing import build, debug_config, moe_block_index
from torchao.prototype.moe_training import utils as ao_utils
from torchao.prototype.moe_training.config import Float8TrainingOpConfig, MXFP8TrainingOpConfig
from torchtitan.components.quantization import float8 as tt_float8
from torchtitan.components.quantization.float8 import Float8GroupedExpertsConverter
from torchtitan.models.common.token_dispatcher import TorchAOTokenDispatcher

from torchtitan_nemotron3.low_precision import LowPrecisionConfig
from torchtitan_nemotron3.model.moe import ReluSquaredGroupedExperts
from torchtitan_nemotron3.low_precision.dispatch import PaddedTokenDispatcher
from torchtitan_nemotron3.low_precision.fp8_grouped import emulated_float8_rowwise_grouped_mm


class Spy:
    """Counts calls and their op config; runs torchao's op, or, for FP8 (which has
    no CPU kernels), our emulation of it."""

    def __init__(self, real):
        self.real, self.configs = real, []

    def __call__(self, A, B_t, config, offs=None, bias=None):
        self.configs.append(type(config))
        if isinstance(config, Float8TrainingOpConfig):
            return emulated_float8_rowwise_grouped_mm(A, B_t, offs)
        return self.real(A, B_t, config=config, offs=offs)


@pytest.fixture
def spy(monkeypatch):
    s = Spy(ao_utils._quantize_then_scaled_grouped_mm)
    monkeypatch.setattr(ao_utils, "_quantize_then_scaled_grouped_mm", s)
    return s


def _moe_forward_backward(block_config, layers: int = 1):
    torch.manual_seed(0)
    block = build(block_config)
    x = torch.randn(2, 64, 256, dtype=torch.bfloat16, requires_grad=True)
    for _ in range(layers):
        block(x).float().square().mean().backward()
    return block


@pytest.mark.parametrize(
    "recipe,emulate,op_config",
    [("mxfp8", True, MXFP8TrainingOpConfig), ("float8_rowwise", False, Float8TrainingOpConfig)],
)
def test_our_quantized_experts_call_torchaos_grouped_gemm_twice_per_forward(
    spy, recipe, emulate, op_config
):
    cfg = debug_config(LowPrecisionConfig(experts=recipe, emulate=emulate))
    block = cfg.layers[moe_block_index(cfg)]
    assert isinstance(block.mixer.routed_experts.token_dispatcher, TorchAOTokenDispatcher.Config)
    _moe_forward_backward(block, layers=2)
    assert spy.configs == [op_config] * 4  # up and down projections, two forwards


def test_torchtitan_030_float8_experts_converter_stays_bf16_on_our_experts(spy, monkeypatch):
    """Why the package has its own FP8 experts: TorchTitan 0.3.0's converter wraps
    the weights for torchao's ``quantize_``, which intercepts ops named
    ``_grouped_mm``; our experts call ``nemotron3::grouped_mm``: zero quantized
    calls, silently bf16 (fixed upstream after 0.3.0, PR #4240)."""
    monkeypatch.setattr(tt_float8, "has_cuda_capability", lambda *_: True)  # SM89 check
    cfg = debug_config()
    cfg = Float8GroupedExpertsConverter.Config().build().convert(cfg)
    block = cfg.layers[moe_block_index(cfg)]
    experts = block.mixer.routed_experts.inner_experts
    assert type(experts) is tt_float8._float8_experts_cache[ReluSquaredGroupedExperts].Config
    # Its padded dispatcher's index kernel is Triton-only; ours is the same on CPU.
    block.mixer.routed_experts.token_dispatcher = PaddedTokenDispatcher.Config(
        num_experts=8, top_k=2, pad_multiple=16
    )
    built = _moe_forward_backward(block)
    weight = built.mixer.routed_experts.inner_experts.w1_EFD
    assert type(weight.data).__name__ == "Float8TrainingWeightWrapperTensor"  # applied
    assert spy.configs == []
