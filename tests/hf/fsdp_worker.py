"""One rank of the 2-process FSDP test (test_hf_fsdp.py), CPU / gloo.

Each rank builds the model on meta, shards it with TorchTitan's
``apply_fsdp_to_decoder`` (what ``parallelize_nemotronh`` uses), materialises it
with random values, then runs TorchTitan's own checkpointer code for
``initial_load_in_hf`` and ``last_save_in_hf`` on the sharded state dict. Every
loaded tensor, gathered, must equal the single-process ``from_pretrained``, and the
export must equal transformers' files.
"""

import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
from hf_checkpoints import assert_same_tensors, read_tensors
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torchtitan.components.checkpointer import AsyncMode, CheckpointManager
from torchtitan.components.checkpointer.base import ModelWrapper
from torchtitan.distributed.fsdp import apply_fsdp_to_decoder

from torchtitan_nemotron3 import from_pretrained
from torchtitan_nemotron3.hf import NemotronHStateDictAdapter
from torchtitan_nemotron3.hf.config import args_from_hf_config
from torchtitan_nemotron3.model import build_model_config


def _sharded_model(args, mesh):
    model_config = build_model_config(args)
    with torch.device("meta"):
        model = model_config.build()
    apply_fsdp_to_decoder(
        model,
        mesh,
        param_dtype=torch.float32,
        reduce_dtype=torch.float32,
        pp_enabled=False,
    )
    model.to_empty(device="cpu")
    torch.manual_seed(1234 + dist.get_rank())  # garbage that differs per rank
    with torch.no_grad():
        model.init_states()
    return model, model_config


def _expert_placements(model) -> str:
    for layer in model.layers.values():
        if layer.moe_enabled:
            return str(layer.mixer.routed_experts.inner_experts.w1_EFD.placements)
    return ""


def run_case(case: dict, mesh, out_root: str) -> str:
    hub = case["hub"]
    args = args_from_hf_config(hub)
    model, model_config = _sharded_model(args, mesh)
    adapter = NemotronHStateDictAdapter(model_config, case.get("assets"))
    manager = SimpleNamespace(
        sd_adapter=adapter, states={"model": ModelWrapper(model)}, pg=None, stager=None
    )

    # checkpoint.initial_load_in_hf
    CheckpointManager.dcp_load(
        manager,
        manager.states["model"].state_dict(),
        checkpoint_id=case["load_from"],
        from_hf=True,
        from_quantized=False,
    )
    reference = from_pretrained(hub).state_dict()
    gathered = {}
    for name, value in model.state_dict().items():
        assert isinstance(value, DTensor) or "expert_bias" in name, name
        gathered[name] = value.full_tensor() if isinstance(value, DTensor) else value
    assert_same_tensors(gathered, reference)

    # checkpoint.last_save_in_hf
    out = os.path.join(out_root, case["name"])
    CheckpointManager.dcp_save(
        manager,
        manager.states["model"].state_dict(),
        checkpoint_id=out,
        async_mode=AsyncMode.DISABLED,
        to_hf=True,
    )
    dist.barrier()
    if dist.get_rank() == 0:
        assert_same_tensors(read_tensors(out), read_tensors(hub))
    dist.barrier()
    return _expert_placements(model)


def worker(
    rank: int, world_size: int, rendezvous: str, cases: list, out_root: str, results
):
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size
    )
    try:
        for case in cases:
            shape = case.get("mesh", (world_size,))
            names = ("dp_replicate", "fsdp") if len(shape) == 2 else ("fsdp",)
            mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
            placements = run_case(case, mesh, out_root)
            if rank == 0:
                results[case["name"]] = placements
    finally:
        dist.destroy_process_group()
