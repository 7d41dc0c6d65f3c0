"""The hook through which fine-tuning folds its extra tensors into an HF export.

A LoRA run stores each adapted weight as three tensors (``W``, ``A``, ``B``); the
hub format has one, ``W + alpha/r · B A``. Interop sits below fine-tuning, so
``hf/`` names no adapter format: it asks the registered ``WeightMerge`` which
modules of a model config are adapted, which stored tensors belong to them, and to
fold them. ``lora/`` registers its merge when it is imported, which it is wherever
a LoRA model config exists (only its converter builds one). Without a registered
merge nothing is adapted, and a state dict holding adapters is refused by name
(an unknown tensor), never exported unmerged.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WeightMerge:
    scalings: Callable[[Any], dict[str, float]]
    """``{module FQN: scale}`` of the adapted modules of a model config."""

    parts: tuple[str, ...]
    """Name suffixes of an adapted module's extra tensors (``.lora_a.weight``)."""

    merge: Callable[[dict, dict[str, float]], dict]
    """``(state_dict, scalings)`` → the state dict with each adapted weight folded
    and the extra tensors removed."""

    def is_part(self, name: str) -> bool:
        return bool(self.parts) and name.endswith(self.parts)


NO_MERGE = WeightMerge(scalings=lambda _: {}, parts=(), merge=lambda sd, _: sd)
_registered: list[WeightMerge] = [NO_MERGE]


def register_weight_merge(merge: WeightMerge) -> None:
    """Make ``merge`` the one exports use (``lora/__init__.py`` calls this)."""
    _registered[0] = merge


def weight_merge() -> WeightMerge:
    return _registered[0]
