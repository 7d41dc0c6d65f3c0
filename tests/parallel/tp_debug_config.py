"""Test-only: the NemotronH debug run on its dense layer types only
(``M*M-M*M-``: Mamba2, attention, relu² MLP), for comparing tensor parallelism
with one process through the trainer.

MoE layers are left out on purpose: a token whose top-k expert scores nearly tie
can pick another expert under another summation order, and through the bias
update that reroutes later steps too, which moves weights by ~1e-3 while the loss
moves by ~1e-6 (TorchTitan's tie-free ``debug.moe_force_load_balance`` routing
fails under TP: its gather mixes a DTensor with a tensor). The in-process tests
(``tp_worker.py``) cover the MoE layers under TP.

``[job] module = "tests.parallel.tp_debug_config"``, ``config = "nemotron3_debug_tp"``.
"""

import dataclasses

from torchtitan_nemotron3.config_registry import nemotron3_debugmodel
from torchtitan_nemotron3.model import build_model_config, flavor_args
from torchtitan_nemotron3.train.trainer import NemotronHTrainer

ARGS = flavor_args("debugmodel").replace(
    hybrid_override_pattern="M*M-M*M-", num_hidden_layers=None
)


def nemotron3_debug_tp() -> NemotronHTrainer.Config:
    config = nemotron3_debugmodel()
    config.model_spec = dataclasses.replace(
        config.model_spec, model=build_model_config(ARGS)
    )
    return config
