"""Emulated MXFP8 under expert parallelism through the real trainer, 2 CPU ranks over
gloo: the padded all-to-all dispatch (expert groups padded after the exchange)
against the padded local dispatch. EP=2 borrows its ranks from data parallelism,
so the reference reading the same batches is FSDP=2 on the same ranks
(tests/parallel/test_expert_parallel.py explains)."""

import pytest
from train._harness import run_training, write_fp32_debug_toml

pytestmark = pytest.mark.integration

STEPS = 3


def test_mxfp8_emulated_ep2_trains_as_fsdp2(tmp_path):
    toml = write_fp32_debug_toml(
        tmp_path / "debug.toml", config="nemotron3_debugmodel_mxfp8_emulated"
    )
    common = ["--training.steps", str(STEPS), "--checkpoint.no_enable"]
    fsdp = run_training(toml, 2, common, tmp_path / "fsdp2", timeout=900)
    ep = run_training(
        toml, 2, [*common, "--parallelism.expert_parallel_degree", "2"],
        tmp_path / "ep2", timeout=900,
    )  # fmt: skip
    assert len(ep) == len(fsdp) == STEPS
    assert max(abs(a - b) for a, b in zip(ep, fsdp)) < 1e-3, (ep, fsdp)
    assert ep[-1] < ep[0]
