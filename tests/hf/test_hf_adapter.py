"""NemotronHStateDictAdapter, tensor by tensor, and through TorchTitan's own
checkpointer code (``CheckpointManager.dcp_load`` / ``dcp_save``) on one process.

Counting experts matters: TorchTitan's MoE adapter once dropped experts silently
(issue #4475) and its trainer loads with ``strict=False``, so every test here
checks that all E experts of every MoE layer arrive.
"""

import json
import os
import re
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from nemotron_testing import build_model  # noqa: E402
from hf_checkpoints import (  # noqa: E402
    assert_like_transformers,
    assert_same_tensors,
    read_tensors,
    save_transformers_checkpoint,
    tiny_args,
    transformers_model,
)
from torchtitan.components.checkpointer import AsyncMode, CheckpointManager  # noqa: E402
from torchtitan.components.checkpointer.base import ModelWrapper  # noqa: E402

from torchtitan_nemotron3 import from_pretrained, save_pretrained  # noqa: E402
from torchtitan_nemotron3.hf import NemotronHStateDictAdapter  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    args = tiny_args(1)
    root = tmp_path_factory.mktemp("adapter")
    hub = save_transformers_checkpoint(root / "hub", args, seed=3)
    prefixed = save_transformers_checkpoint(
        root / "prefixed", args, seed=3, save_original_format=False
    )
    return args, hub, prefixed


@pytest.fixture(scope="module")
def bf16_checkpoint(checkpoint, tmp_path_factory):
    """transformers' bf16 save of the same model (its router dtypes, its call)."""
    args = checkpoint[0]
    root = tmp_path_factory.mktemp("bf16")
    return save_transformers_checkpoint(
        root / "hub", args, seed=3, dtype=torch.bfloat16
    )


def adapter_for(model, hf_assets_path=None) -> NemotronHStateDictAdapter:
    return NemotronHStateDictAdapter(model.config, hf_assets_path)


def experts_per_layer(hf_names) -> dict[tuple[str, str], set[int]]:
    found = {}
    for name in hf_names:
        m = re.match(
            r"backbone\.layers\.(\d+)\.mixer\.experts\.(\d+)\.(\w+)\.weight$", name
        )
        if m:
            found.setdefault((m.group(1), m.group(3)), set()).add(int(m.group(2)))
    return found


def test_to_hf_gives_transformers_tensors_with_every_expert(checkpoint):
    args, hub, _ = checkpoint
    model = from_pretrained(hub)
    hf = adapter_for(model).to_hf(model.state_dict())
    assert_same_tensors(hf, read_tensors(hub))
    moe_layers = [
        str(i) for i, c in enumerate(args.hybrid_override_pattern) if c == "E"
    ]
    counts = experts_per_layer(hf)
    assert sorted(counts) == sorted(
        (i, p) for i in moe_layers for p in ("up_proj", "down_proj")
    )
    assert all(ids == set(range(args.n_routed_experts)) for ids in counts.values())


# transformers' in-memory names (its NemotronH modules) → ours, written out here and
# not taken from hf/naming.py, so that a consistent mistake in both directions of the
# adapter (e.g. experts stacked in reverse) cannot cancel out.
_THEIRS_TO_OURS = {
    "mixer.experts.up_proj": "mixer.routed_experts.inner_experts.w1_EFD",
    "mixer.experts.down_proj": "mixer.routed_experts.inner_experts.w2_EDF",
    "mixer.gate.weight": "mixer.router.gate.weight",
    "mixer.gate.e_score_correction_bias": "mixer.expert_bias_E",
}


def test_expert_k_is_transformers_expert_k(checkpoint):
    """Our expert k (loaded from the hub files, and written back by to_hf) holds
    transformers' expert k of the model that wrote the files, and the router's row k
    scores it."""
    args, hub, _ = checkpoint
    theirs = transformers_model(args, seed=3).state_dict()
    model = from_pretrained(hub)
    ours = model.state_dict()
    exported = adapter_for(model).to_hf(ours)
    checked = 0
    for i, kind in enumerate(args.hybrid_override_pattern):
        if kind != "E":
            continue
        for their_suffix, our_suffix in _THEIRS_TO_OURS.items():
            want = theirs[f"model.layers.{i}.{their_suffix}"]
            got = ours[f"layers.{i}.{our_suffix}"]
            assert got.shape == want.shape, (their_suffix, got.shape, want.shape)
            for k in range(args.n_routed_experts):
                assert torch.equal(got[k], want[k]), (i, their_suffix, k)
        for proj in ("up_proj", "down_proj"):
            stacked = theirs[f"model.layers.{i}.mixer.experts.{proj}"]
            for k in range(args.n_routed_experts):
                hub_k = exported[f"backbone.layers.{i}.mixer.experts.{k}.{proj}.weight"]
                assert torch.equal(hub_k, stacked[k]), (i, proj, k)
                checked += 1
    assert checked == 2 * args.n_routed_experts * args.hybrid_override_pattern.count("E")
    assert checked > 0


def test_from_hf_inverts_to_hf(checkpoint):
    args, _, _ = checkpoint
    model = build_model(args, seed=5)
    state = model.state_dict()
    adapter = adapter_for(model)
    back = adapter.from_hf(adapter.to_hf(state))
    assert_same_tensors(back, state)


def test_missing_or_extra_expert_is_an_error(checkpoint):
    args, _, _ = checkpoint
    model = build_model(args)
    adapter = adapter_for(model)
    hf = adapter.to_hf(model.state_dict())
    layer = args.hybrid_override_pattern.index("E")
    dropped = dict(hf)
    del dropped[f"backbone.layers.{layer}.mixer.experts.2.up_proj.weight"]
    with pytest.raises(
        ValueError, match=rf"layers\.{layer}\..*w1_EFD: missing experts \[2\]"
    ):
        adapter.from_hf(dropped)
    extra = dict(hf)
    extra[
        f"backbone.layers.{layer}.mixer.experts.{args.n_routed_experts}.down_proj.weight"
    ] = hf[f"backbone.layers.{layer}.mixer.experts.0.down_proj.weight"]
    with pytest.raises(
        ValueError, match=rf"unexpected experts \[{args.n_routed_experts}\]"
    ):
        adapter.from_hf(extra)
    with pytest.raises(KeyError, match="not a NemotronH"):
        adapter.from_hf({"model.embed_tokens.weight": hf["backbone.embeddings.weight"]})
    with pytest.raises(KeyError, match="not a NemotronH"):
        adapter.to_hf({"layers.0.attention.wq.weight": torch.zeros(1)})


def test_to_hf_dtypes_of_a_bf16_model_are_transformers(checkpoint, bf16_checkpoint):
    """What last_save_in_hf writes from a bf16 state dict has the dtypes of
    transformers' own bf16 save of the same architecture (the router in fp32)."""
    model = build_model(
        checkpoint[0], dtype=torch.bfloat16
    )  # .to() casts the router too
    hf = adapter_for(model).to_hf(model.state_dict())
    assert_like_transformers(hf, read_tensors(bf16_checkpoint), values=False)


def test_storage_reader_serves_both_spellings(checkpoint):
    import torch.distributed.checkpoint as dcp

    args, hub, prefixed = checkpoint
    reference = from_pretrained(hub)
    for path in (hub, prefixed):
        model = build_model(args, seed=9)
        adapter = adapter_for(model)
        hf = adapter.to_hf(model.state_dict())
        dcp.load(hf, storage_reader=adapter.get_hf_storage_reader(path), no_dist=True)
        model.load_state_dict(adapter.from_hf(hf), strict=True)
        assert_same_tensors(model.state_dict(), reference.state_dict())
    with pytest.raises(NotImplementedError, match="quantized"):
        adapter.get_hf_storage_reader(hub, from_quantized=True)


def manager(adapter, model):
    """The attributes CheckpointManager.dcp_load/dcp_save use, and nothing else."""
    return SimpleNamespace(
        sd_adapter=adapter, states={"model": ModelWrapper(model)}, pg=None, stager=None
    )


@pytest.mark.parametrize("spelling", ["hub", "prefixed"])
def test_torchtitan_initial_load_in_hf(checkpoint, spelling):
    """TorchTitan's own load code: to_hf → get_hf_storage_reader → dcp.load → from_hf
    → ModelWrapper.load_state_dict (strict=False)."""
    args, hub, prefixed = checkpoint
    model = build_model(args, seed=11)
    mgr = manager(adapter_for(model), model)
    CheckpointManager.dcp_load(
        mgr,
        mgr.states["model"].state_dict(),
        checkpoint_id=hub if spelling == "hub" else prefixed,
        from_hf=True,
        from_quantized=False,
    )
    assert_same_tensors(model.state_dict(), from_pretrained(hub).state_dict())


def test_torchtitan_initial_load_of_a_bf16_checkpoint(checkpoint, bf16_checkpoint):
    """Into fp32 training weights, whichever dtype the file gives the router."""
    model = build_model(checkpoint[0], seed=11)
    mgr = manager(adapter_for(model), model)
    CheckpointManager.dcp_load(
        mgr,
        mgr.states["model"].state_dict(),
        checkpoint_id=bf16_checkpoint,
        from_hf=True,
        from_quantized=False,
    )
    want = from_pretrained(bf16_checkpoint, dtype=torch.float32)
    assert_same_tensors(model.state_dict(), want.state_dict())


@pytest.mark.parametrize("with_index", [False, True])
def test_torchtitan_last_save_in_hf(checkpoint, tmp_path, with_index):
    """TorchTitan's own export code: to_hf → HuggingFaceStorageWriter (one file, or
    the hub index's files when hf_assets_path has one) → consolidation."""
    _, hub, _ = checkpoint
    model = from_pretrained(hub)
    assets = None
    if with_index:
        assets = tmp_path / "assets"
        save_pretrained(model, assets, max_shard_size="40KB")
    adapter = adapter_for(model, assets)
    out = tmp_path / "export"
    CheckpointManager.dcp_save(
        manager(adapter, model),
        model.state_dict(),
        checkpoint_id=str(out),
        async_mode=AsyncMode.DISABLED,
        to_hf=True,
    )
    written = read_tensors(out)
    assert_same_tensors(written, read_tensors(hub))
    if with_index:
        index = json.loads((assets / "model.safetensors.index.json").read_text())
        assert sorted(
            f for f in os.listdir(out) if f.endswith(".safetensors")
        ) == sorted(set(index["weight_map"].values()))


def test_asset_index_in_model_spelling_is_normalised(checkpoint, tmp_path):
    """An hf_assets_path whose index uses transformers' in-memory names (3-D
    experts) still maps every hub tensor of an export to a file."""
    args, hub, _ = checkpoint
    save_transformers_checkpoint(
        tmp_path / "assets", args, save_original_format=False, max_shard_size="40KB"
    )
    model = from_pretrained(hub)
    adapter = adapter_for(model, tmp_path / "assets")
    assert sorted(adapter.fqn_to_index_mapping) == sorted(read_tensors(hub))
