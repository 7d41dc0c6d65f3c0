"""NemotronH model: pattern → blocks of Mamba2 / attention / MLP / MoE mixers."""

from .args import NemotronHArgs
from .block import NemotronHBlock
from .flavors import FLAVORS, build_model_config, flavor_args
from .model import NemotronHModel
from .pattern import parse_hybrid_pattern

__all__ = [
    "FLAVORS",
    "NemotronHArgs",
    "NemotronHBlock",
    "NemotronHModel",
    "build_model_config",
    "flavor_args",
    "parse_hybrid_pattern",
]
