"""Latent MoE checkpoints: transformers writes one (``fc1_latent_proj`` /
``fc2_latent_proj`` under ``backbone.layers.N.mixer.``, latent-wide experts), we
load and save it bit for bit, through ``from_pretrained``/``save_pretrained`` and
through TorchTitan's ``initial_load_in_hf`` / ``last_save_in_hf`` code, and
``moe_latent_size`` is read from and written to config.json.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_checkpoints import (
    assert_same_tensors,
    read_tensors,
    save_transformers_checkpoint,
    tiny_args,
)
from nemotron_testing import build_model
from torchtitan.components.checkpointer import AsyncMode, CheckpointManager
from torchtitan.components.checkpointer.base import ModelWrapper

from torchtitan_nemotron3 import from_pretrained, save_pretrained
from torchtitan_nemotron3.hf import NemotronHStateDictAdapter
from torchtitan_nemotron3.hf.config import (
    args_from_hf_config,
    args_from_model_config,
    hf_config_from_args,
    write_hf_config,
)
from torchtitan_nemotron3.model import build_model_config

LATENT = 16


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    args = tiny_args(1, moe_latent_size=LATENT)
    hub = save_transformers_checkpoint(
        tmp_path_factory.mktemp("latent") / "hub", args, 4
    )
    return args, Path(hub)


def test_transformers_checkpoint_has_latent_tensors(checkpoint):
    args, hub = checkpoint
    names = read_tensors(hub)
    H, E = args.hidden_size, args.n_routed_experts
    for layer, kind in enumerate(args.hybrid_override_pattern):
        if kind != "E":
            continue
        prefix = f"backbone.layers.{layer}.mixer."
        assert names[prefix + "fc1_latent_proj.weight"].shape == (LATENT, H)
        assert names[prefix + "fc2_latent_proj.weight"].shape == (H, LATENT)
        for e in range(E):
            up = names[f"{prefix}experts.{e}.up_proj.weight"]
            assert up.shape == (args.moe_intermediate_size, LATENT)
    assert json.loads((hub / "config.json").read_text())["moe_latent_size"] == LATENT


def test_round_trip_bitwise_and_logits(checkpoint, tmp_path):
    args, hub = checkpoint
    model = from_pretrained(hub)
    assert args_from_model_config(model.config).moe_latent_size == LATENT
    save_pretrained(model, tmp_path / "ours")
    assert_same_tensors(read_tensors(tmp_path / "ours"), read_tensors(hub))
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["moe_latent_size"] == LATENT

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert hf.config.moe_latent_size == LATENT
    reference = transformers.AutoModelForCausalLM.from_pretrained(hub)
    assert_same_tensors(hf.state_dict(), reference.state_dict())
    tokens = torch.randint(0, args.vocab_size, (2, 2 * args.chunk_size + 3))
    with torch.no_grad():
        assert rel_err(model(tokens), hf(tokens).logits) <= 1e-5


def _manager(model):
    adapter = NemotronHStateDictAdapter(model.config, None)
    return SimpleNamespace(
        sd_adapter=adapter, states={"model": ModelWrapper(model)}, pg=None, stager=None
    )


def test_torchtitan_initial_load_and_last_save_in_hf(checkpoint, tmp_path):
    args, hub = checkpoint
    model = build_model(args, seed=11)
    mgr = _manager(model)
    CheckpointManager.dcp_load(
        mgr,
        mgr.states["model"].state_dict(),
        checkpoint_id=str(hub),
        from_hf=True,
        from_quantized=False,
    )
    assert_same_tensors(model.state_dict(), from_pretrained(hub).state_dict())
    CheckpointManager.dcp_save(
        mgr,
        model.state_dict(),
        checkpoint_id=str(tmp_path / "export"),
        async_mode=AsyncMode.DISABLED,
        to_hf=True,
    )
    assert_same_tensors(read_tensors(tmp_path / "export"), read_tensors(hub))


def test_config_json_reads_and_writes_moe_latent_size(tmp_path):
    args = tiny_args(0, moe_latent_size=24)
    assert hf_config_from_args(args)["moe_latent_size"] == 24
    assert args_from_hf_config(hf_config_from_args(args)) == args
    assert args_from_model_config(build_model_config(args)) == args
    write_hf_config(tmp_path, args)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert config.moe_latent_size == 24
    config.save_pretrained(tmp_path / "again")
    assert args_from_hf_config(tmp_path / "again") == args
    # no latent projection: null in config.json, and back to None
    plain = tiny_args(0)
    assert hf_config_from_args(plain)["moe_latent_size"] is None
    assert args_from_hf_config(hf_config_from_args(plain)).moe_latent_size is None
