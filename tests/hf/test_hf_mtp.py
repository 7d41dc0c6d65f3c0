"""MTP tensors in hub-format checkpoints: ``mtp.layers.{i}.*`` (no ``backbone.``
prefix), written here by hand with the hub's names (transformers drops them on
load and cannot write them), loaded and saved bit for bit with MTP on, skipped
with MTP off, and a checkpoint without them refused when MTP is on.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_checkpoints import (
    assert_like_transformers,
    assert_same_tensors,
    read_tensors,
    save_transformers_checkpoint,
    tiny_args,
)
from nemotron_testing import build_model
from safetensors.torch import save_file
from torchtitan.components.checkpointer import AsyncMode, CheckpointManager
from torchtitan.components.checkpointer.base import ModelWrapper

from torchtitan_nemotron3 import from_pretrained, save_pretrained
from torchtitan_nemotron3.hf import (
    CheckpointMismatchError,
    NemotronHStateDictAdapter,
)
from torchtitan_nemotron3.hf.naming import keep_fp32
from torchtitan_nemotron3.model import build_model_config, flavor_args

LATENT = 16


def hub_mtp_tensors(args, dtype, seed) -> dict[str, torch.Tensor]:
    """The MTP block ("*E") as the hub names it (docs/super.md), random values;
    the routing tensors fp32 whatever ``dtype``."""
    H, E, I, Z = (
        args.hidden_size,
        args.n_routed_experts,
        args.moe_intermediate_size,
        LATENT,
    )
    Ish = args.moe_shared_expert_intermediate_size
    q, kv = (
        args.num_attention_heads * args.head_dim,
        args.num_key_value_heads * args.head_dim,
    )
    shapes = {
        "mtp.layers.0.enorm.weight": (H,),
        "mtp.layers.0.hnorm.weight": (H,),
        "mtp.layers.0.eh_proj.weight": (H, 2 * H),
        "mtp.layers.0.norm.weight": (H,),
        "mtp.layers.0.mixer.q_proj.weight": (q, H),
        "mtp.layers.0.mixer.k_proj.weight": (kv, H),
        "mtp.layers.0.mixer.v_proj.weight": (kv, H),
        "mtp.layers.0.mixer.o_proj.weight": (H, q),
        "mtp.layers.1.norm.weight": (H,),
        "mtp.layers.1.mixer.gate.weight": (E, H),
        "mtp.layers.1.mixer.gate.e_score_correction_bias": (E,),
        "mtp.layers.1.mixer.fc1_latent_proj.weight": (Z, H),
        "mtp.layers.1.mixer.fc2_latent_proj.weight": (H, Z),
        "mtp.layers.1.mixer.shared_experts.up_proj.weight": (Ish, H),
        "mtp.layers.1.mixer.shared_experts.down_proj.weight": (H, Ish),
        "mtp.layers.1.final_layernorm.weight": (H,),
    }
    for e in range(E):
        shapes[f"mtp.layers.1.mixer.experts.{e}.up_proj.weight"] = (I, Z)
        shapes[f"mtp.layers.1.mixer.experts.{e}.down_proj.weight"] = (Z, I)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        fp32 = ".mixer.gate." in name
        out[name] = torch.randn(shape, generator=g).to(torch.float32 if fp32 else dtype)
    return out


def write_checkpoint(path: Path, dtype, with_mtp: bool, seed: int = 4) -> Path:
    args = tiny_args(1, moe_latent_size=LATENT)
    save_transformers_checkpoint(path, args, seed, dtype=dtype)
    if with_mtp:
        tensors = read_tensors(path)
        tensors.update(hub_mtp_tensors(args, dtype, seed))
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((path / "config.json").read_text())
        config.update(num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E")
        (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mtp_round_trip_bitwise(tmp_path, dtype):
    src = write_checkpoint(tmp_path / "hub", dtype, with_mtp=True)
    model = from_pretrained(src, mtp_num_layers=2)
    assert model.mtp is not None and model.mtp.num_depths == 2
    save_pretrained(model, tmp_path / "ours")
    ours = read_tensors(tmp_path / "ours")
    # bit for bit, in the dtypes transformers writes, except the router, which we
    # always write in fp32 (installed transformers <= 5.23 writes the gate in bf16)
    assert_like_transformers(ours, read_tensors(src))
    router = [name for name in ours if keep_fp32(name)]
    assert any(n.startswith("mtp.") for n in router)
    assert any(n.startswith("backbone.") for n in router)
    assert {ours[n].dtype for n in router} == {torch.float32}
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    assert config["mtp_hybrid_override_pattern"] == "*E"
    assert config["mtp_layers_block_type"] == ["full_attention", "moe"]
    assert "mtp_num_layers" not in config  # a training choice, not the checkpoint's
    # transformers loads it, skipping the MTP tensors as it does the hub's
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ours", dtype="auto"
    )
    assert hf.config.num_nextn_predict_layers == 1
    assert not any(n.startswith("mtp.") for n in hf.state_dict())


def test_mtp_off_skips_the_mtp_tensors(tmp_path):
    src = write_checkpoint(tmp_path / "hub", torch.float32, with_mtp=True)
    model = from_pretrained(src)
    assert model.mtp is None
    save_pretrained(model, tmp_path / "ours")
    want = {k: v for k, v in read_tensors(src).items() if not k.startswith("mtp.")}
    assert_same_tensors(read_tensors(tmp_path / "ours"), want)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0


def test_checkpoint_without_mtp_is_refused_with_mtp_on(tmp_path):
    src = write_checkpoint(tmp_path / "hub", torch.float32, with_mtp=False)
    assert from_pretrained(src).mtp is None
    with pytest.raises(CheckpointMismatchError, match=r"no MTP \(mtp\.\*\) tensors"):
        from_pretrained(src, mtp_num_layers=2)


def test_torchtitan_initial_load_without_mtp_tensors_is_refused(tmp_path):
    src = write_checkpoint(tmp_path / "hub", torch.float32, with_mtp=False)
    args = tiny_args(1, moe_latent_size=LATENT).replace(
        num_nextn_predict_layers=1, mtp_num_layers=2
    )
    model = build_model(args)
    mgr = _manager(model)
    with pytest.raises(CheckpointMismatchError, match=r"no MTP \(mtp\.\*\) tensors"):
        CheckpointManager.dcp_load(
            mgr,
            mgr.states["model"].state_dict(),
            checkpoint_id=str(src),
            from_hf=True,
            from_quantized=False,
        )


def _manager(model):
    return SimpleNamespace(
        sd_adapter=NemotronHStateDictAdapter(model.config, None),
        states={"model": ModelWrapper(model)},
        pg=None,
        stager=None,
    )


def test_torchtitan_initial_load_and_last_save_in_hf(tmp_path):
    src = write_checkpoint(tmp_path / "hub", torch.float32, with_mtp=True)
    args = tiny_args(1, moe_latent_size=LATENT).replace(
        num_nextn_predict_layers=1, mtp_num_layers=2
    )
    model = build_model(args, seed=11)
    mgr = _manager(model)
    CheckpointManager.dcp_load(
        mgr,
        mgr.states["model"].state_dict(),
        checkpoint_id=str(src),
        from_hf=True,
        from_quantized=False,
    )
    want = from_pretrained(src, mtp_num_layers=2).state_dict()
    assert_same_tensors(model.state_dict(), want)
    CheckpointManager.dcp_save(
        mgr,
        model.state_dict(),
        checkpoint_id=str(tmp_path / "export"),
        async_mode=AsyncMode.DISABLED,
        to_hf=True,
    )
    assert_same_tensors(read_tensors(tmp_path / "export"), read_tensors(src))


def test_super_has_the_hubs_1040_mtp_tensors():
    cfg = build_model_config(flavor_args("super-120B"))
    with torch.device("meta"):
        model = cfg.build()
    names = NemotronHStateDictAdapter(cfg, None).to_hf(model.state_dict())
    mtp = [n for n in names if n.startswith("mtp.")]
    assert len(mtp) == 1040
    assert len(names) == 42_683  # Megatron-Bridge's verified tensor count
    assert "mtp.layers.0.eh_proj.weight" in names
    assert names["mtp.layers.0.eh_proj.weight"].shape == (4096, 8192)
    assert "mtp.layers.1.final_layernorm.weight" in names
    assert "mtp.layers.1.mixer.experts.511.down_proj.weight" in names
    assert not any(n.startswith("backbone.mtp") for n in names)


def test_dcp_to_hf_to_dcp_keeps_the_mtp_block(tmp_path):
    """A training run's DCP checkpoint with MTP → hub format (the block under its
    hub names; the config.json's num_nextn_predict_layers=1 is enough) → DCP."""
    import torch.distributed.checkpoint as dcp

    from torchtitan_nemotron3.hf.config import args_from_hf_config
    from torchtitan_nemotron3.hf.dcp_convert import dcp_to_hf, hf_to_dcp

    src = write_checkpoint(tmp_path / "hub", torch.float32, with_mtp=True)
    model = from_pretrained(src, mtp_num_layers=2)
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "step-1"), no_dist=True)
    args = args_from_hf_config(src)
    assert args.num_nextn_predict_layers == 1 and args.mtp_num_layers == 0
    dcp_to_hf(tmp_path / "step-1", tmp_path / "hf", args)
    assert_same_tensors(read_tensors(tmp_path / "hf"), read_tensors(src))

    hf_to_dcp(tmp_path / "hf", tmp_path / "dcp", mtp_num_layers=2)
    state = {k: torch.empty_like(v) for k, v in model.state_dict().items()}
    dcp.load(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert_same_tensors(state, model.state_dict())
