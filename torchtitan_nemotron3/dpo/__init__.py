"""Preference tuning (DPO) of NemotronH: preference pairs rendered by the chat
template (``data.py``, ``pairs.py``), the objective over packed rows (``loss.py``),
the reference policy (``reference.py``), the trainer and validator that use them.
``config_registry.nemotron3_debug_dpo`` / ``nemotron3_nano_30b_dpo`` are the runs.
"""

from .data import PreferenceDataLoader
from .loss import dpo_terms, reply_logps, token_logps
from .reference import ReferenceTable, adapters_off
from .trainer import DPOConfig, DPOTrainer
from .validate import DPOValidator

__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "DPOValidator",
    "PreferenceDataLoader",
    "ReferenceTable",
    "adapters_off",
    "dpo_terms",
    "reply_logps",
    "token_logps",
]
