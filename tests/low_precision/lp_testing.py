"""Shared helpers of the low-precision tests: debug-model blocks and models built
the way the trainer builds them (meta, then initialised), converted or not."""

import torch

from torchtitan_nemotron3 import model_registry
from torchtitan_nemotron3.low_precision import LowPrecisionConfig, apply


def debug_config(lp: LowPrecisionConfig | None = None):
    model = model_registry("debugmodel", kernel_backend="torch", attn_backend="sdpa").model
    return apply(model, lp or LowPrecisionConfig())


def build(config, dtype=torch.bfloat16, seed: int = 0) -> torch.nn.Module:
    with torch.device("meta"):
        module = config.build()
    module.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        module.init_states(buffer_device=torch.device("cpu"))
    return module.to(dtype)


def moe_block_index(config) -> int:
    return next(i for i, b in enumerate(config.layers) if b.layer_type == "E")
