"""Low-precision training: FP8 rowwise (H100) and MXFP8 (B200) GEMMs for NemotronH's
dense Linear layers and routed experts, through torchao, with the router gate,
lm_head and other sensitive layers kept exact (``config.DEFAULT_KEEP_BF16``).

``config`` (the job's ``[low_precision]`` section) and ``peak`` import without
torchao; the converters (``linear``, ``experts``, ``experts_converter``) need it.
"""

from .config import DEFAULT_KEEP_BF16, LowPrecisionConfig, apply, check_combination, check_hardware
from .peak import fp8_peak_flops, use_fp8_peak

__all__ = [
    "DEFAULT_KEEP_BF16",
    "LowPrecisionConfig",
    "apply",
    "check_combination",
    "check_hardware",
    "fp8_peak_flops",
    "use_fp8_peak",
]
