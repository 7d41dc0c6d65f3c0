"""Hugging Face interop: hub-format checkpoints ↔ our NemotronH.

* ``from_pretrained`` / ``save_pretrained``: a model from / to a hub-format
  directory (``config.json`` + safetensors + tokenizer files), strict and atomic;
  ``from_pretrained`` also takes a Hub repo id (through the Hugging Face cache);
* ``NemotronHStateDictAdapter``: TorchTitan's ``initial_load_in_hf`` /
  ``last_save_in_hf`` on FSDP-sharded models;
* ``args_from_hf_config`` / ``hf_config_from_args``: ``config.json`` ↔ NemotronHArgs.
"""

from .config import args_from_hf_config, args_from_model_config, hf_config_from_args
from .errors import CheckpointMismatchError, CorruptCheckpointError
from .io import from_pretrained, save_pretrained
from .state_dict_adapter import NemotronHStateDictAdapter
from .storage import NemotronHStorageReader

__all__ = [
    "CheckpointMismatchError",
    "CorruptCheckpointError",
    "NemotronHStateDictAdapter",
    "NemotronHStorageReader",
    "args_from_hf_config",
    "args_from_model_config",
    "from_pretrained",
    "hf_config_from_args",
    "save_pretrained",
]
