"""QLoRA checkpoints hold the adapters (and, through TorchTitan, their optimizer
state) only: the NF4 base cannot go through DCP, and need not, since it is
re-derived from ``initial_load_path`` (or from the seeded init) on every start."""

from torchtitan.components.checkpointer.base import ModelWrapper

from ..lora.merge import is_adapter_key


class AdaptersOnly(ModelWrapper):
    """TorchTitan's ``ModelWrapper`` restricted to the LoRA adapters."""

    def _get_state_dict(self):
        return {k: v for k, v in super()._get_state_dict().items() if is_adapter_key(k)}
