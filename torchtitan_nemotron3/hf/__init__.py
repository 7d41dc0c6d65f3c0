"""Hugging Face interop: hub-format checkpoints ↔ our NemotronH.

* ``from_pretrained`` / ``save_pretrained``: a model from / to a hub-format
  directory (``config.json`` + safetensors), strict and atomic;
* ``NemotronHStateDictAdapter``: TorchTitan's ``initial_load_in_hf`` /
  ``last_save_in_hf`` on FSDP-sharded models;
* ``args_from_hf_config`` / ``hf_config_from_args``: ``config.json`` ↔ NemotronHArgs.
"""

from .config import args_from_hf_config, args_from_model_config, hf_config_from_args
from .io import CheckpointMismatchError, from_pretrained, save_pretrained
from .state_dict_adapter import NemotronHStateDictAdapter
from .storage import NemotronHStorageReader

__all__ = [
    "CheckpointMismatchError",
    "NemotronHStateDictAdapter",
    "NemotronHStorageReader",
    "args_from_hf_config",
    "args_from_model_config",
    "from_pretrained",
    "hf_config_from_args",
    "save_pretrained",
]
