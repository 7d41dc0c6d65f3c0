"""A bad checkpoint fails with one line naming the problem: the file, and the
tensor where one is at fault. Mismatches and unreadable files are found before any
tensor data is read."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("transformers")

from hf_checkpoints import read_tensors, save_transformers_checkpoint, tiny_args  # noqa: E402

from torchtitan_nemotron3 import from_pretrained, save_pretrained  # noqa: E402
from torchtitan_nemotron3.hf import (  # noqa: E402
    CheckpointMismatchError,
    CorruptCheckpointError,
    NemotronHStateDictAdapter,
)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    args = tiny_args(0)
    return save_transformers_checkpoint(
        tmp_path_factory.mktemp("good") / "hf", args
    ), args


def rewrite(src, dst, edit) -> str:
    """Copy a checkpoint with its tensor dict (and config) edited."""
    os.makedirs(dst)
    tensors = read_tensors(src)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    edit(tensors, config)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


def first_expert_layer(args) -> int:
    return args.hybrid_override_pattern.index("E")


def test_missing_tensor_is_named(good, tmp_path):
    src, args = good
    i = first_expert_layer(args)
    key = f"backbone.layers.{i}.mixer.experts.3.down_proj.weight"
    path = rewrite(src, tmp_path / "c", lambda t, c: t.pop(key))
    with pytest.raises(CheckpointMismatchError, match=r"missing tensors \(1\): " + key):
        from_pretrained(path)


def test_unexpected_tensor_is_named(good, tmp_path):
    src, args = good
    key = f"backbone.layers.{first_expert_layer(args)}.mixer.experts.99.up_proj.weight"

    def add(tensors, config):
        tensors[key] = torch.zeros(args.moe_intermediate_size, args.hidden_size)

    with pytest.raises(
        CheckpointMismatchError, match=r"unexpected tensors \(1\): " + key
    ):
        from_pretrained(rewrite(src, tmp_path / "c", add))


def test_shape_mismatch_names_key_and_both_shapes(good, tmp_path):
    src, args = good

    def shrink(tensors, config):
        tensors["lm_head.weight"] = tensors["lm_head.weight"][:-1].clone()

    with pytest.raises(
        CheckpointMismatchError,
        match=rf"lm_head.weight: expected \({args.vocab_size}, {args.hidden_size}\), "
        rf"found \({args.vocab_size - 1}, {args.hidden_size}\)",
    ):
        from_pretrained(rewrite(src, tmp_path / "c", shrink))


def test_config_disagreeing_with_tensors(good, tmp_path):
    """A config.json for a different size: every tensor it touches is reported."""
    src, args = good

    def wider(tensors, config):
        config["n_routed_experts"] = args.n_routed_experts + 4

    with pytest.raises(
        CheckpointMismatchError, match=r"missing tensors \(\d+\).*experts\."
    ):
        from_pretrained(rewrite(src, tmp_path / "c", wider))


def test_another_model_type(good, tmp_path):
    src, _ = good

    def llama(tensors, config):
        config["model_type"] = "llama"

    with pytest.raises(ValueError, match="model_type='llama'; expected 'nemotron_h'"):
        from_pretrained(rewrite(src, tmp_path / "c", llama))


def test_missing_config_and_missing_weights(good, tmp_path):
    src, _ = good
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nowhere")
    os.makedirs(tmp_path / "no_config")
    os.link(
        os.path.join(src, "model.safetensors"),
        tmp_path / "no_config" / "model.safetensors",
    )
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path / "no_config")
    os.makedirs(tmp_path / "pickled")
    os.link(os.path.join(src, "config.json"), tmp_path / "pickled" / "config.json")
    torch.save({}, tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle checkpoints are not read"):
        from_pretrained(tmp_path / "pickled")


def test_index_naming_a_missing_shard(good, tmp_path):
    src, _ = good
    os.makedirs(tmp_path / "c")
    os.link(os.path.join(src, "config.json"), tmp_path / "c" / "config.json")
    index = {
        "metadata": {},
        "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"},
    }
    (tmp_path / "c" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        from_pretrained(tmp_path / "c")


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def sharded(good, tmp_path_factory):
    src, _ = good
    out = tmp_path_factory.mktemp("sharded") / "hf"
    save_pretrained(from_pretrained(src), out, max_shard_size="40KB")
    return out


def copy_checkpoint(src, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_truncated_shard_names_file_and_tensors(sharded, tmp_path):
    """A shard cut short (an interrupted copy): the file and the tensors it lost."""
    path = copy_checkpoint(sharded, tmp_path / "c")
    index = json.loads((tmp_path / "c" / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["lm_head.weight"]
    in_shard = [k for k, f in index["weight_map"].items() if f == shard]
    with open(os.path.join(path, shard), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(path, shard)) - 10)
    with pytest.raises(CorruptCheckpointError) as excinfo:
        from_pretrained(path)
    message = one_line(excinfo)
    assert f"{shard}: truncated" in message
    cut = message.split("tensors cut off: ")[1].split(", ")
    assert cut and set(cut) <= set(in_shard), message


def test_corrupt_header_names_the_file(sharded, tmp_path):
    path = copy_checkpoint(sharded, tmp_path / "c")
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[1]
    with open(os.path.join(path, shard), "r+b") as f:
        f.seek(8)
        f.write(b"\xff" * 16)
    with pytest.raises(
        CorruptCheckpointError, match=f"{shard}: not a readable safetensors"
    ):
        from_pretrained(path)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_malformed_json_names_the_file(sharded, tmp_path, name):
    path = copy_checkpoint(sharded, tmp_path / "c")
    text = (tmp_path / "c" / name).read_text()
    (tmp_path / "c" / name).write_text(text[: len(text) // 2])
    with pytest.raises(CorruptCheckpointError) as excinfo:
        from_pretrained(path)
    assert f"{os.path.join(path, name)}: not valid JSON" in one_line(excinfo)


def test_non_finite_weight_is_named(good, tmp_path):
    """NaN/inf in a weight: from_pretrained refuses (unless allowed), and so does
    TorchTitan's initial_load_in_hf through our storage reader."""
    src, args = good
    key = next(k for k in read_tensors(src) if k.endswith("mixer.D"))

    def poison(tensors, config):
        tensors[key] = tensors[key].clone()
        tensors[key][-1] = float("nan")

    path = rewrite(src, tmp_path / "c", poison)
    with pytest.raises(CorruptCheckpointError) as excinfo:
        from_pretrained(path)
    assert f"{key} holds non-finite values" in one_line(excinfo)
    loaded = from_pretrained(path, allow_non_finite=True).state_dict()
    want = read_tensors(path)[key]
    got = loaded[key.removeprefix("backbone.")]  # a Mamba D: the same name inside
    assert torch.isnan(got[-1]) and torch.equal(got[:-1], want[:-1]), (got, want)

    import torch.distributed.checkpoint as dcp
    from nemotron_testing import build_model
    from torch.distributed.checkpoint.api import CheckpointException

    model = build_model(args)
    adapter = NemotronHStateDictAdapter(model.config, None)
    hf = adapter.to_hf(model.state_dict())
    with pytest.raises(CheckpointException) as excinfo:  # DCP's wrapper, per rank
        dcp.load(hf, storage_reader=adapter.get_hf_storage_reader(path), no_dist=True)
    error, _ = excinfo.value.failures[0]
    assert isinstance(error, CorruptCheckpointError)
    assert f"{key} holds non-finite values" in str(error)
