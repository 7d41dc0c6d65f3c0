"""Test-only: the NemotronH debug run with a Megatron pattern whose ``|`` puts
four layers in each pipeline stage (the same layers as ``nemotron3_debugmodel``).

``[job] module = "tests.parallel.pp_segments_config"``,
``config = "nemotron3_debug_pp_segments"``.
"""

import dataclasses

from torchtitan_nemotron3.config_registry import nemotron3_debugmodel
from torchtitan_nemotron3.model import build_model_config, flavor_args
from torchtitan_nemotron3.train.trainer import NemotronHTrainer

SEGMENTED_PATTERN = "MEM*|EM-M|EM*E|MEM-"  # "MEM*EM-MEM*EMEM-" in 4 segments


def nemotron3_debug_pp_segments() -> NemotronHTrainer.Config:
    config = nemotron3_debugmodel()
    args = flavor_args("debugmodel").replace(
        hybrid_override_pattern=SEGMENTED_PATTERN, num_hidden_layers=None
    )
    config.model_spec = dataclasses.replace(
        config.model_spec, model=build_model_config(args)
    )
    return config
