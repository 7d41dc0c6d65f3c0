"""Test-only job: the NemotronH debug run, small and fp32, with the fault hooks of
``inject`` installed in every rank (``[job] module = "tests.faults.faults_config"``,
``config = "nemotron3_debug_faults"``): 12 steps, a checkpoint every 4 with the
full state at the end, ``keep_latest_k`` 3."""

from __future__ import annotations

from tests.faults import inject  # noqa: F401 (installs the hooks)
from torchtitan_nemotron3.config_registry import nemotron3_debugmodel


def nemotron3_debug_faults():
    config = nemotron3_debugmodel()
    config.training.local_batch_size = 2
    config.training.seq_len = 64
    config.training.steps = 12
    config.training.mixed_precision_param = "float32"
    config.metrics.log_freq = 1
    config.checkpoint.enable = True
    config.checkpoint.interval = 4
    config.checkpoint.keep_latest_k = 3
    config.checkpoint.last_save_model_only = False
    config.debug.seed = 0
    return config
