"""Low-precision training: FP8 rowwise (H100) and MXFP8 (B200) GEMMs for NemotronH's
dense Linear layers and routed experts, through torchao, with the router gate,
lm_head and other sensitive layers kept exact (``config.DEFAULT_KEEP_BF16``)."""

from .config import DEFAULT_KEEP_BF16, LowPrecisionConfig, apply, check_combination, check_hardware
from .experts import Float8RowwiseReluSquaredGroupedExperts, mxfp8_experts_cls
from .experts_converter import NemotronHGroupedExpertsConverter
from .linear import NemotronHFloat8Linear, NemotronHLinearConverter, NemotronHMXFP8Linear
from .peak import fp8_peak_flops, use_fp8_peak

__all__ = [
    "DEFAULT_KEEP_BF16",
    "Float8RowwiseReluSquaredGroupedExperts",
    "LowPrecisionConfig",
    "NemotronHFloat8Linear",
    "NemotronHGroupedExpertsConverter",
    "NemotronHLinearConverter",
    "NemotronHMXFP8Linear",
    "apply",
    "check_combination",
    "check_hardware",
    "fp8_peak_flops",
    "mxfp8_experts_cls",
    "use_fp8_peak",
]
