"""Converted models keep plain parameters: a BF16 state dict loads strictly, and
their DCP and HF exports are byte for byte a BF16 model's with the same weights."""

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from lp_testing import build, debug_config

from torchtitan_nemotron3 import save_pretrained
from torchtitan_nemotron3.low_precision import LowPrecisionConfig

RECIPES = [
    LowPrecisionConfig(linear="mxfp8", experts="mxfp8", emulate=True),
    LowPrecisionConfig(linear="float8_rowwise", experts="float8_rowwise", emulate=True),
]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def plain():
    return build(debug_config(), dtype=torch.float32, seed=3)


@pytest.mark.parametrize("lp", RECIPES, ids=["mxfp8", "float8_rowwise"])
def test_converted_model_loads_bf16_weights_and_exports_them_plain(plain, lp, tmp_path):
    model = build(debug_config(lp), dtype=torch.float32, seed=4)
    quantized = [
        n for n, m in model.named_modules() if "MXFP8" in type(m).__name__ or "Float8" in type(m).__name__
    ]
    assert len(quantized) == 57 + 5  # Linears + routed-expert layers
    reference = plain.state_dict()
    model.load_state_dict(reference, strict=True)
    got = model.state_dict()
    assert list(got) == list(reference)
    for name, t in got.items():
        assert type(t) is torch.Tensor and t.dtype == reference[name].dtype, name
        assert torch.equal(t, reference[name]), name

    for which, m in (("plain", plain), ("converted", model)):
        dcp.save(m.state_dict(), checkpoint_id=str(tmp_path / f"dcp-{which}"))
        save_pretrained(m, tmp_path / f"hf-{which}")
    for kind in ("dcp", "hf"):
        want, have = _files(tmp_path / f"{kind}-plain"), _files(tmp_path / f"{kind}-converted")
        assert want.keys() == have.keys()
        # (DCP's .metadata holds a fresh save id: compared as its contents below.)
        differ = [k for k in want if want[k] != have[k] and k != ".metadata"]
        assert not differ, differ
    want, have = (
        dcp.FileSystemReader(str(tmp_path / f"dcp-{w}")).read_metadata().state_dict_metadata
        for w in ("plain", "converted")
    )
    assert want == have
    # The DCP checkpoint loads back into a plain model with no safe globals.
    fresh = build(debug_config(), dtype=torch.float32, seed=5)
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "dcp-converted"))
    assert all(torch.equal(state[k], reference[k]) for k in reference)
