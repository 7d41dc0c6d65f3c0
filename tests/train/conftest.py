"""Make ``tests.train.*`` importable for in-process config loading.

TOML files used by these tests name their test-only base config as
``[job] module = "tests.train.qwen3_debug_config"`` (the same name works for
``run_train.sh``, which puts the repo root on PYTHONPATH). pytest's default
import mode only adds the test directories to ``sys.path``, so add the root.
"""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
