"""transformers → from_pretrained → save_pretrained → transformers, bit for bit.

transformers writes the checkpoint (the independent reference), we load and save
it, and the files we write must equal transformers' tensor for tensor (names,
shapes, dtypes, bits) and load back into transformers with the same logits.
"""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_checkpoints import (  # noqa: E402
    assert_like_transformers,
    assert_same_tensors,
    read_tensors,
    save_transformers_checkpoint,
    tiny_args,
)
from safetensors.torch import save_file  # noqa: E402

import torchtitan_nemotron3  # noqa: E402
from torchtitan_nemotron3 import from_pretrained, save_pretrained  # noqa: E402
from torchtitan_nemotron3.hf.naming import keep_fp32  # noqa: E402

RTOL = 1e-5


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("seed", [0, 1])
def test_fp32_round_trip_bitwise_and_logits(tmp_path, seed):
    args = tiny_args(seed)
    src = save_transformers_checkpoint(tmp_path / "hf", args, seed)
    model = from_pretrained(src)
    assert not model.training
    out = tmp_path / "ours"
    save_pretrained(model, out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert_same_tensors(read_tensors(out), read_tensors(src))

    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    reference = transformers.AutoModelForCausalLM.from_pretrained(src)
    assert_same_tensors(hf.state_dict(), reference.state_dict())
    tokens = torch.randint(0, args.vocab_size, (2, 2 * args.chunk_size + 3))
    with torch.no_grad():
        assert rel_err(model(tokens), hf(tokens).logits) <= RTOL


def test_bf16_exports_match_transformers(tmp_path):
    """transformers' own bf16 checkpoint of a model (what it keeps in fp32 is its
    call) against ours: re-saving it, and saving the fp32 model with dtype=bf16."""
    args = tiny_args(2)
    fp32 = save_transformers_checkpoint(tmp_path / "fp32", args, 2)
    src = save_transformers_checkpoint(tmp_path / "bf16", args, 2, dtype=torch.bfloat16)
    theirs = read_tensors(src)

    model = from_pretrained(src)  # dtype from the checkpoint, router in fp32
    assert model.lm_head.weight.dtype == torch.bfloat16
    for name, t in model.state_dict().items():
        assert t.dtype == (torch.float32 if keep_fp32(name) else torch.bfloat16), name
    save_pretrained(model, tmp_path / "resaved")
    save_pretrained(from_pretrained(fp32), tmp_path / "cast", dtype=torch.bfloat16)
    reference = transformers.AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    for out in ("resaved", "cast"):
        assert_like_transformers(read_tensors(tmp_path / out), theirs)
        config = json.loads((tmp_path / out / "config.json").read_text())
        assert config["dtype"] == "bfloat16"
        # transformers sees the model it saved, bit for bit
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / out, dtype="auto"
        )
        assert_same_tensors(hf.state_dict(), reference.state_dict())


def test_router_loads_from_bf16_or_fp32(tmp_path):
    """The hub's checkpoints (and transformers <= 5.23) store the gate in bf16,
    transformers 5.24 in fp32: both load, into an fp32 gate, exactly."""
    args = tiny_args(3)
    src = save_transformers_checkpoint(tmp_path / "hf", args, 3, dtype=torch.bfloat16)
    tensors = read_tensors(src)
    gates = [k for k in tensors if k.endswith("mixer.gate.weight")]
    assert gates
    for dtype in (torch.bfloat16, torch.float32):
        out = tmp_path / str(dtype)
        out.mkdir()
        (out / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
        stored = {k: t.to(dtype) if k in gates else t for k, t in tensors.items()}
        save_file(stored, out / "model.safetensors")
        state = from_pretrained(out).state_dict()
        for gate in gates:
            ours = gate.removeprefix("backbone.").replace(".gate.", ".router.gate.")
            assert state[ours].dtype == torch.float32, ours
            assert torch.equal(state[ours], stored[gate].float()), gate


def test_model_prefixed_3d_expert_variant_loads(tmp_path):
    """transformers' in-memory names (model.*, stacked experts) are read too."""
    args = tiny_args(1)
    hub = save_transformers_checkpoint(tmp_path / "hub", args, 1)
    prefixed = save_transformers_checkpoint(
        tmp_path / "prefixed", args, 1, save_original_format=False
    )
    on_disk = read_tensors(prefixed)
    assert any(
        k.startswith("model.layers.") and k.endswith("experts.up_proj") for k in on_disk
    )
    assert not any(k.startswith("backbone.") for k in on_disk)
    a, b = from_pretrained(hub), from_pretrained(prefixed)
    assert_same_tensors(a.state_dict(), b.state_dict())
    save_pretrained(b, tmp_path / "ours")  # always written in hub format
    assert_same_tensors(read_tensors(tmp_path / "ours"), read_tensors(hub))


def test_sharded_save_writes_an_index_and_reloads(tmp_path):
    args = tiny_args(0)
    src = save_transformers_checkpoint(tmp_path / "hf", args)
    model = from_pretrained(src)
    out = tmp_path / "sharded"
    save_pretrained(model, out, max_shard_size="40KB")
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 2 and "model.safetensors" not in files
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    tensors = read_tensors(out)
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    for name in files:  # within the limit, unless one tensor alone exceeds it
        held = [k for k, f in index["weight_map"].items() if f == name]
        size = sum(tensors[k].numel() * tensors[k].element_size() for k in held)
        assert size <= 40_000 or len(held) == 1, (name, size, held)
    assert_same_tensors(tensors, read_tensors(src))
    assert_same_tensors(from_pretrained(out).state_dict(), model.state_dict())
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    reference = transformers.AutoModelForCausalLM.from_pretrained(src)
    assert_same_tensors(hf.state_dict(), reference.state_dict())


def test_public_api_is_exported():
    assert torchtitan_nemotron3.from_pretrained is from_pretrained
    assert torchtitan_nemotron3.save_pretrained is save_pretrained
    spec = torchtitan_nemotron3.model_registry("debugmodel")
    assert spec.state_dict_adapter.__name__ == "NemotronHStateDictAdapter"
