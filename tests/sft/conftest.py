"""``tests/train/_harness.py`` (run_train.sh and its per-step losses) for the SFT tests."""

import sys
from pathlib import Path

_TRAIN = str(Path(__file__).resolve().parents[1] / "train")
_ROOT = str(Path(__file__).resolve().parents[2])
for path in (_TRAIN, _ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)
