"""Mamba2 under context parallelism equals the unsharded mixer (``model/mamba2_cp.py``).

CP groups of 2, 3 and 4 CPU ranks over gloo in fp64 (one spawn of 4, ``cp_worker.py``),
TorchTitan's head-tail order and contiguous shards, packed rows whose documents
start inside a conv halo, exactly on a shard boundary and just before one, and a
row that is one document; also unpacked rows (``seq_idx`` None): outputs, input
gradients and rank-summed parameter gradients within 1e-10. The model's blocks
(``M*-M``) composed the way its forward runs them under CP (global document ids
from positions, then every block), logits and every parameter gradient, likewise.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

L = 48  # 2·W head-tail segments of 12, 8 and 6 tokens (chunks of 4, conv halo of 3)
SIZES = [2, 3, 4]


pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def errors(tmp_path_factory):
    from cp_worker import worker

    tmp = tmp_path_factory.mktemp("mamba_cp")
    # fork: the ranks inherit the imported torchtitan (a spawn re-imports it per
    # rank, most of this test's time on a small CPU box); no CUDA is involved.
    mp.start_processes(
        worker,
        args=(max(SIZES), str(tmp / "rdv"), ["mamba", "model"], SIZES, L),
        nprocs=max(SIZES),
        start_method="fork",
    )
    return {int(k): v for k, v in json.loads((tmp / "errors.json").read_text()).items()}


@pytest.mark.parametrize("cp", SIZES)
def test_mamba2_cp_equals_unsharded(errors, cp):
    from cp_worker import TOL

    got = {n: e for n, e in errors[cp].items() if n.startswith("mamba/")}
    # The check is sensitive: cut at the shard boundaries (no state, no halo), the
    # rows are far off.
    assert got.pop("mamba/without_state_passing") > 1e-2
    assert len(got) > 30 and max(got.values()) <= TOL, got


@pytest.mark.parametrize("cp", SIZES)
def test_model_blocks_compose_under_cp(errors, cp):
    from cp_worker import TOL

    got = {n: e for n, e in errors[cp].items() if n.startswith("model/")}
    assert len(got) > 30 and max(got.values()) <= TOL, got


KERNELS_INSTALLED = all(
    importlib.util.find_spec(n) is not None
    for n in ("mamba_ssm", "fla", "triton", "numpy")
)


@pytest.mark.skipif(not KERNELS_INSTALLED, reason="mamba-ssm / fla-core not installed")
def test_kernel_path_under_cp_matches_torch(tmp_path):
    """CP=2 head-tail on the ``cuda`` backend (interpreted Triton kernels: the
    shifted per-segment ``seq_idx``, the halo ids) vs the torch mixer on whole
    rows; fp32 tolerances as ``tests/kernels/test_interpret.py``."""
    worker = Path(__file__).with_name("cp_worker.py")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(worker.parent.parent), env.get("PYTHONPATH", "")]
    )
    proc = subprocess.run(
        [sys.executable, str(worker), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    errors = json.loads((tmp_path / "kernel_errors.json").read_text())
    assert errors["out"] <= 1e-5 and errors["dx"] <= 1e-4, errors
    assert len(errors) > 10 and max(errors.values()) <= 1e-4, errors
