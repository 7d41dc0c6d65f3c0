"""Test-only: the NemotronH debug run with latent MoE and multi-token prediction
(``debugmodel-mtp``: one MTP block applied twice, λ = 0.3), through the real
trainer. ``--module tests.train.mtp_config --config nemotron3_debug_mtp``."""

from torchtitan_nemotron3 import model_registry
from torchtitan_nemotron3.config_registry import nemotron3_debugmodel


def nemotron3_debug_mtp():
    config = nemotron3_debugmodel()
    config.model_spec = model_registry("debugmodel-mtp")
    return config


def nemotron3_debug_latent():
    """The debug model with latent MoE only (MTP off)."""
    config = nemotron3_debugmodel()
    config.model_spec = model_registry("debugmodel-mtp")
    config.model_spec.model.mtp = None
    return config
