"""QLoRA: LoRA on a frozen base stored in NF4 (torchao), experts included.

``nf4.py``: torchao's NF4 with a legal block size per tensor; ``experts.py``:
the grouped expert GEMM that dequantizes per call and keeps no bf16 bank for
backward; ``transform.py``: which tensors go to NF4 and the post-load transform;
``load.py``: a hub checkpoint read straight into NF4, one tensor (bank) at a time.
torchao is optional (``pip install -e '.[qlora]'``): imported on use.
"""

from .transform import nf4_parameters, nf4_targets, quantize_base

__all__ = ["nf4_parameters", "nf4_targets", "quantize_base"]
