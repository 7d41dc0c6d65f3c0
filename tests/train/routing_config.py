"""Test-only: the NemotronH debug run with routing known in advance.

``--module tests.train.routing_config --config nemotron3_debug_biased_router``: every
router's gate is zero (all scores sigmoid(0) = 0.5) and its correction bias is
``BIAS`` (experts 0 and 1 far above the rest), so every token goes to experts 0 and
1 in every MoE layer. A test-only subclass sets them after the real trainer's init.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch.distributed.tensor import DTensor

from torchtitan_nemotron3.config_registry import nemotron3_debugmodel
from torchtitan_nemotron3.train.trainer import NemotronHTrainer

BIAS = [10.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


class BiasedRouterTrainer(NemotronHTrainer):
    @dataclass(kw_only=True, slots=True)
    class Config(NemotronHTrainer.Config):
        pass

    def __init__(self, config):
        super().__init__(config)
        with torch.no_grad():
            for part in self.model_parts:
                for module in part.modules():
                    if getattr(module, "moe_enabled", False):
                        moe = module.moe
                        _local(moe.router.gate.weight).zero_()
                        _local(moe.expert_bias_E).copy_(torch.tensor(BIAS))


def nemotron3_debug_biased_router() -> NemotronHTrainer.Config:
    base = nemotron3_debugmodel()
    config = BiasedRouterTrainer.Config(
        **{f.name: getattr(base, f.name) for f in fields(base)}
    )
    config.training.local_batch_size = 2
    config.training.seq_len = 64
    config.training.steps = 2
    config.debug.seed = 0
    return config
