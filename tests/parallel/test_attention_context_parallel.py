"""Attention under context parallelism equals unsharded attention (``model/attention_cp.py``).

CP groups of 2, 3 and 4 CPU ranks over gloo in fp64 (one fork of 4, ``cp_worker.py``):
K/V all-gathered, the document-causal mask from global token indices and global
document ids; TorchTitan's head-tail order and contiguous shards, the packed rows
of the Mamba2 test and unpacked rows: outputs, input gradients and rank-summed
parameter gradients within 1e-10. Then the "flex" backend's CP path (K/V in row
order, the block mask's query rows this rank's segments) on 2 ranks, forward
only. The single-process masks are ``tests/model/test_attention_backends.py``'s.
"""

import json

import pytest
import torch.multiprocessing as mp

L = 48  # 2·W head-tail segments of 12, 8 and 6 tokens
SIZES = [2, 3, 4]


@pytest.fixture(scope="module")
def errors(tmp_path_factory):
    from cp_worker import worker

    tmp = tmp_path_factory.mktemp("attention_cp")
    # fork: the ranks inherit the imported torchtitan (a spawn re-imports it per
    # rank, most of this test's time on a small CPU box); no CUDA is involved.
    mp.start_processes(
        worker,
        args=(max(SIZES), str(tmp / "rdv"), ["attention"], SIZES, L),
        nprocs=max(SIZES),
        start_method="fork",
    )
    return {int(k): v for k, v in json.loads((tmp / "errors.json").read_text()).items()}


@pytest.mark.integration  # starts processes (one fork of 4, ≈5 s)
@pytest.mark.parametrize("cp", SIZES)
def test_attention_cp_equals_unsharded(errors, cp):
    from cp_worker import TOL

    got = errors[cp]
    assert len(got) >= 12 and max(got.values()) <= TOL, got


@pytest.fixture(scope="module")
def flex_errors(tmp_path_factory):
    from cp_worker import flex_worker

    tmp = tmp_path_factory.mktemp("flex_cp")
    mp.start_processes(
        flex_worker,
        args=(2, str(tmp / "rdv"), L),
        nprocs=2,
        start_method="fork",
    )
    return json.loads((tmp / "flex_errors.json").read_text())


@pytest.mark.integration  # starts processes (one fork of 2)
def test_flex_attention_cp_equals_unsharded(flex_errors):
    """The "flex" backend under CP=2 (forward: eager flex on CPU) equals the
    masked SDPA on whole rows, for one layer and the whole model's forward."""
    from cp_worker import TOL

    assert len(flex_errors) == 8, flex_errors
    assert max(flex_errors.values()) <= TOL, flex_errors
