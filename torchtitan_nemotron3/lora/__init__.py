"""LoRA fine-tuning of NemotronH through TorchTitan's ``LoRAConverter``.

``converter.py``: the converter (default targets, checks), passed to
``model_registry(flavor, converters=[...])``; ``merge.py``: adapters folded into
full weights, which every HF export writes (the state dict adapter calls it);
``export.py``: merged ``save_pretrained`` of a live model, DCP checkpoint → merged
HF directory; ``peft.py``: the adapters alone in PEFT's format.

This package imports nothing from ``hf`` at package level: ``hf``'s state dict
adapter imports ``converter`` and ``merge``.
"""

from .converter import DEFAULT_TARGET_MODULES, NemotronHLoRAConverter, lora_scalings
from .merge import merge_lora

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "NemotronHLoRAConverter",
    "lora_scalings",
    "merge_lora",
]
