"""HF load and export through an FSDP-sharded state dict, 2 processes over gloo.

The sharded path (TorchTitan's ``initial_load_in_hf`` / ``last_save_in_hf`` on a
model sharded by ``apply_fsdp_to_decoder``) must give exactly the tensors of the
1-process path, for every way FSDP lays out the 3-D expert weights:

* ``even``: 4 experts, ``Shard(0)``, 2 whole experts per rank;
* ``uneven``: 3 experts, ``Shard(0)``, 2 + 1 (read from the ``model.``/3-D
  spelling, exported into the file layout of an index in ``hf_assets_path``);
* ``dim1``: 1 expert, FSDP degree > E so TorchTitan shards experts on dim 1
  (``Shard(1)``; FSDP2 itself refuses uneven dim-1 shards);
* ``hsdp``: a (dp_replicate=1, fsdp=2) mesh: ``(Replicate(), Shard(0))``.
"""

import pytest
import torch.multiprocessing as mp

pytestmark = pytest.mark.integration  # spawns 2 processes

pytest.importorskip("transformers")

from fsdp_worker import worker  # noqa: E402
from hf_checkpoints import save_transformers_checkpoint, tiny_args  # noqa: E402

from torchtitan_nemotron3 import from_pretrained, save_pretrained  # noqa: E402

WORLD_SIZE = 2


def moe_args(seed, experts, width=24):
    return tiny_args(
        seed,
        n_routed_experts=experts,
        num_experts_per_tok=min(2, experts),
        n_group=1,
        topk_group=1,
        moe_intermediate_size=width,
    )


def test_fsdp_load_and_export_match_single_process(tmp_path):
    cases = []
    for name, args in [
        ("even", moe_args(0, 4)),
        ("uneven", moe_args(1, 3)),
        ("dim1", moe_args(2, 1, width=20)),
        ("hsdp", moe_args(3, 4)),
    ]:
        hub = save_transformers_checkpoint(
            tmp_path / f"{name}-hub", args, seed=len(cases)
        )
        case = {"name": name, "hub": hub, "load_from": hub}
        if name == "uneven":
            case["load_from"] = save_transformers_checkpoint(
                tmp_path / f"{name}-prefixed",
                args,
                seed=len(cases),
                save_original_format=False,
            )
            assets = tmp_path / f"{name}-assets"
            save_pretrained(from_pretrained(hub), assets, max_shard_size="40KB")
            case["assets"] = str(assets)
        if name == "hsdp":
            case["mesh"] = (1, WORLD_SIZE)
        cases.append(case)

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(
            worker,
            args=(
                WORLD_SIZE,
                str(tmp_path / "rendezvous"),
                cases,
                str(tmp_path / "out"),
                results,
            ),
            nprocs=WORLD_SIZE,
            join=True,
        )
        placements = dict(results)
    assert placements == {
        "even": "(Shard(dim=0),)",
        "uneven": "(Shard(dim=0),)",
        "dim1": "(Shard(dim=1),)",
        "hsdp": "(Replicate(), Shard(dim=0))",
    }
