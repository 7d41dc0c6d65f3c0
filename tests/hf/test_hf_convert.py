"""scripts/convert_checkpoint.py: TorchTitan DCP → HF → DCP gives back every tensor;
hf-config completes a TorchTitan HF export with a checked config.json and the
tokenizer files."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

transformers = pytest.importorskip("transformers")

from hf_checkpoints import (  # noqa: E402
    assert_like_transformers,
    assert_same_tensors,
    read_tensors,
    save_transformers_checkpoint,
    tiny_args,
    write_tiny_assets,
)

from torchtitan_nemotron3 import from_pretrained, save_pretrained  # noqa: E402
from torchtitan_nemotron3.hf import (  # noqa: E402
    CheckpointMismatchError,
    CorruptCheckpointError,
)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "convert_checkpoint.py"


def convert(*argv: str) -> None:
    spec = importlib.util.spec_from_file_location("convert_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = [*map(str, argv)] + (["--no_progress"] if argv[0] != "hf-config" else [])
    assert module.main(argv) == 0


def load_dcp(path) -> dict[str, torch.Tensor]:
    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {
        k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in metadata.items()
    }
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 'training checkpoint': the model's state dict flattened at the top level
    beside optimizer state, as TorchTitan's CheckpointManager writes it."""
    root = tmp_path_factory.mktemp("convert")
    args = tiny_args(2)
    hub = save_transformers_checkpoint(root / "hub", args, seed=4)
    model = from_pretrained(hub)
    state = dict(model.state_dict())
    state["optimizer.state.lm_head.weight.exp_avg"] = torch.randn(3)
    state["train_state.step"] = torch.tensor(20)
    dcp.save(state, checkpoint_id=str(root / "step-20"), no_dist=True)
    return root, args, hub, model


def test_dcp_to_hf_to_dcp(trained, tmp_path):
    root, _, hub, model = trained
    (tmp_path / "cfg").mkdir()
    os.link(os.path.join(hub, "config.json"), tmp_path / "cfg" / "config.json")
    convert(
        "dcp-to-hf",
        root / "step-20",
        tmp_path / "hf",
        "--config_json",
        tmp_path / "cfg",
        "--max_shard_size",
        "50KB",
    )
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert_same_tensors(read_tensors(tmp_path / "hf"), read_tensors(hub))

    convert("hf-to-dcp", tmp_path / "hf", tmp_path / "dcp")
    assert_same_tensors(load_dcp(tmp_path / "dcp"), model.state_dict())
    assert sorted(os.listdir(tmp_path)) == [
        "cfg",
        "dcp",
        "hf",
    ]  # no temporary leftovers


def test_dcp_to_hf_in_bf16_with_a_flavor_and_assets(tmp_path):
    """A bf16 export of a debugmodel training checkpoint equals transformers' own
    bf16 save of the same weights (router dtypes as transformers keeps them, or
    fp32), and carries the tokenizer files."""
    from nemotron_testing import build_model

    from torchtitan_nemotron3.model import flavor_args

    model = build_model(flavor_args("debugmodel"), seed=1)
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "step-1"), no_dist=True)
    assets = write_tiny_assets(tmp_path / "assets")
    convert(
        "dcp-to-hf",
        tmp_path / "step-1",
        tmp_path / "hf",
        "--flavor",
        "debugmodel",
        "--dtype",
        "bfloat16",
        "--assets_dir",
        assets,
    )
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert sorted(os.listdir(assets)) == sorted(
        set(os.listdir(tmp_path / "hf")) - {"config.json", "model.safetensors"}
    )

    save_pretrained(model, tmp_path / "fp32")
    transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp32", dtype=torch.bfloat16
    ).save_pretrained(tmp_path / "theirs")
    assert_like_transformers(
        read_tensors(tmp_path / "hf"), read_tensors(tmp_path / "theirs")
    )


def test_dcp_to_hf_refuses_non_finite_weights(trained, tmp_path):
    """A diverged run's NaN is named, not exported."""
    _, _, hub, model = trained
    state = dict(model.state_dict())
    state["norm.weight"] = state["norm.weight"].clone()
    state["norm.weight"][0] = float("inf")
    dcp.save(state, checkpoint_id=str(tmp_path / "step-9"), no_dist=True)
    with pytest.raises(CorruptCheckpointError, match="norm.weight holds non-finite"):
        convert("dcp-to-hf", tmp_path / "step-9", tmp_path / "hf", "--config_json", hub)
    assert not (tmp_path / "hf").exists()


def test_wrong_architecture_is_named(trained, tmp_path):
    root, _, _, _ = trained
    with pytest.raises(CheckpointMismatchError, match="missing tensors"):
        convert(
            "dcp-to-hf", root / "step-20", tmp_path / "hf", "--flavor", "debugmodel"
        )
    assert not (tmp_path / "hf").exists()


def test_hf_config_for_a_torchtitan_export(trained, tmp_path):
    """last_save_in_hf writes safetensors only; hf-config adds a checked config.json."""
    _, _, hub, _ = trained
    export = tmp_path / "export"
    export.mkdir()
    os.link(
        os.path.join(hub, "model.safetensors"),
        export / "model-00001-of-00001.safetensors",
    )
    (tmp_path / "cfg").mkdir()
    os.link(os.path.join(hub, "config.json"), tmp_path / "cfg" / "config.json")

    with pytest.raises(CheckpointMismatchError):
        convert("hf-config", export, "--flavor", "debugmodel")
    assert not (export / "config.json").exists()

    assets = write_tiny_assets(tmp_path / "assets")
    convert(
        "hf-config", export, "--config_json", tmp_path / "cfg", "--assets_dir", assets
    )
    assert sorted(os.listdir(export)) == sorted(
        ["config.json", "model-00001-of-00001.safetensors", *os.listdir(assets)]
    )
    assert json.loads((export / "config.json").read_text())["dtype"] == "float32"
    assert_same_tensors(
        from_pretrained(export).state_dict(), from_pretrained(hub).state_dict()
    )
