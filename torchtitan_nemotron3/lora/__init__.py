"""LoRA fine-tuning of NemotronH through TorchTitan's ``LoRAConverter``.

``converter.py``: the converter (default targets, checks), passed to
``model_registry(flavor, converters=[...])``; ``merge.py``: adapters folded into
full weights, which every HF export writes (the state dict adapter calls it);
``export.py``: merged ``save_pretrained`` of a live model, DCP checkpoint → merged
HF directory; ``peft.py``: the adapters alone in PEFT's format.

``hf`` sits below this package and names no adapter format: importing this
package registers the merge with ``hf.merge_hook``, which HF exports (the state
dict adapter, ``dcp_to_hf``) call. A LoRA model config exists only once the
converter is imported, so the merge is registered wherever one can be exported.
"""

from ..hf.merge_hook import WeightMerge, register_weight_merge
from .converter import DEFAULT_TARGET_MODULES, NemotronHLoRAConverter, lora_scalings
from .merge import LORA_A, LORA_B, merge_lora

register_weight_merge(
    WeightMerge(scalings=lora_scalings, parts=(LORA_A, LORA_B), merge=merge_lora)
)

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "NemotronHLoRAConverter",
    "lora_scalings",
    "merge_lora",
]
