"""FP8 rowwise and MXFP8 for NemotronH's routed experts, through our grouped-GEMM seam.

Both override ``ReluSquaredGroupedExperts._grouped_mm`` (TorchTitan's seam) to call
torchao's ``_quantize_then_scaled_grouped_mm`` (quantize both operands, scaled
grouped GEMM, quantized backward), keeping plain bf16/fp32 parameters:

* MXFP8: TorchTitan's own class factory (``mx._get_mxfp8_grouped_experts_cls``),
  recipe ``mxfp8_rceil``, or ``mxfp8_emulated_rceil`` (torch code, CPU).
* FP8 rowwise: ours. TorchTitan 0.3.0's ``Float8GroupedExpertsConverter`` wraps
  the parameters with torchao's ``quantize_``, whose tensor subclass intercepts
  only ops named ``_grouped_mm``; our experts call ``nemotron3::grouped_mm``, so
  it silently stays BF16 (``tests/low_precision/test_experts.py`` shows 0 calls).
  Upstream moved to this override pattern after 0.3.0 (PR #4240).

Quantized grouped GEMMs need every expert's token group padded (16 rows FP8,
32 MXFP8, 128 for the SM100 kernels): the converter swaps the dispatcher for the
padded one (``dispatch.py``), as TorchTitan's converters do.
"""

from dataclasses import dataclass, fields

from torchtitan.components.quantization.mx import _get_mxfp8_grouped_experts_cls

from ..model.moe import ReluSquaredGroupedExperts
from .fp8_grouped import emulated_float8_rowwise_grouped_mm


class Float8RowwiseReluSquaredGroupedExperts(ReluSquaredGroupedExperts):
    """Routed experts whose two grouped GEMMs run FP8 rowwise (torchao), or its
    CPU emulation when ``emulate``."""

    @dataclass(kw_only=True, slots=True)
    class Config(ReluSquaredGroupedExperts.Config):
        emulate: bool = False

    def __init__(self, config: Config):
        super().__init__(config)
        self.emulate = config.emulate

    def _grouped_mm(self, *, A, B_t, offs):
        if self.emulate:
            return emulated_float8_rowwise_grouped_mm(A, B_t, offs)
        from torchao.prototype.moe_training import utils
        from torchao.prototype.moe_training.config import Float8TrainingOpConfig

        return utils._quantize_then_scaled_grouped_mm(
            A, B_t, config=Float8TrainingOpConfig(), offs=offs
        )


def mxfp8_experts_cls() -> type:
    """TorchTitan's MXFP8 subclass of our experts (cached by TorchTitan, so its
    ``has_quantization`` recognises it)."""
    return _get_mxfp8_grouped_experts_cls(ReluSquaredGroupedExperts)


def quantized_experts_config(
    cfg: ReluSquaredGroupedExperts.Config, recipe: str, emulate: bool
) -> ReluSquaredGroupedExperts.Config:
    base = {f.name: getattr(cfg, f.name) for f in fields(ReluSquaredGroupedExperts.Config)}
    if recipe == "mxfp8":
        return mxfp8_experts_cls().Config(
            **base, recipe_name="mxfp8_emulated_rceil" if emulate else "mxfp8_rceil"
        )
    assert recipe == "float8_rowwise", recipe
    return Float8RowwiseReluSquaredGroupedExperts.Config(**base, emulate=emulate)


def plain_experts_config(cfg) -> ReluSquaredGroupedExperts.Config:
    base = {f.name: getattr(cfg, f.name) for f in fields(ReluSquaredGroupedExperts.Config)}
    return ReluSquaredGroupedExperts.Config(**base)


def is_quantized_experts(cfg) -> bool:
    return isinstance(
        cfg, (Float8RowwiseReluSquaredGroupedExperts.Config, mxfp8_experts_cls().Config)
    )

