"""One rank of the tensor-parallel tests (test_tensor_parallel.py), CPU / gloo, fp32.

Every rank builds the debug model twice from the same weights: unsharded (the
reference, the same computation on every rank) and sharded at TP = world size by
the declared sharding configs (``model.parallelize``). Both train a few AdamW
steps on the same packed batch (positions restart mid-row, so every row holds
several documents); rank 0 records both losses, the largest relative difference
of each gathered weight, and whether the HF export (``to_hf``) of the sharded
model, gathered, equals that of an unsharded model holding the same weights, bit
for bit, and loads back (``from_hf``) into the sharded layout exactly; likewise
through TorchTitan's checkpointer (``last_save_in_hf`` files, then
``initial_load_in_hf`` into a fresh sharded model).
"""

import dataclasses
import glob
import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor
from torchtitan.components.checkpointer import AsyncMode, CheckpointManager
from torchtitan.components.checkpointer.base import ModelWrapper
from torchtitan.distributed import ParallelDims

from torchtitan_nemotron3.hf import NemotronHStateDictAdapter
from torchtitan_nemotron3.model import build_model_config, flavor_args
from torchtitan_nemotron3.sharding import set_moe_sharding
from torchtitan_nemotron3.tensor_parallel import (
    check_tensor_parallel,
    set_dense_sharding_config,
)
from torchtitan_nemotron3.train import cpu_compat

# AdamW turns fp32 rounding differences (TP sums in another order) into
# lr-sized steps where a gradient is near zero; at 1e-3 the 5-step weights
# differed by up to 1.33e-4 (‖Δ‖/‖W‖, a Mamba out_proj) on this 2-core Xeon
# (2026-12-02); at 3e-4, 4.6e-5.
LR = 3e-4


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _batch(vocab: int, seq_len: int):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab, (2, seq_len), generator=g)
    labels = torch.randint(0, vocab, (2, seq_len), generator=g)
    # Documents of 50, 40, rest (row 0) and 70, rest (row 1).
    cuts = [[50, 40], [70]]
    positions = torch.stack(
        [
            torch.cat(
                [torch.arange(n) for n in [*row, seq_len - sum(row)]]
            )
            for row in cuts
        ]
    )
    return tokens, labels, positions


def _args(pattern: str | None):
    args = flavor_args("debugmodel")
    if pattern is not None:
        args = dataclasses.replace(
            args, hybrid_override_pattern=pattern, num_hidden_layers=None
        )
    return args


def _build(enable_sp: bool | None, tp: int, pattern: str | None = None):
    args = _args(pattern)
    cfg = build_model_config(args, kernel_backend="torch")
    if enable_sp is not None:
        check_tensor_parallel(args, tp)
        set_dense_sharding_config(cfg, enable_sp=enable_sp)
        for layer in cfg.layers:
            if layer.layer_type == "E":
                set_moe_sharding(layer.mixer, enable_ep=False, enable_sp=enable_sp)
    return cfg.build(), cfg


def _train(model, steps: int, batch, vocab: int) -> list[float]:
    tokens, labels, positions = batch
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, foreach=False)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        logits = _full(model(tokens, positions=positions))
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run(
    rank: int, world: int, enable_sp: bool, steps: int, seq_len: int, out_dir: str
) -> dict:
    torch.manual_seed(0)
    pattern = os.environ.get("TP_PATTERN")
    ref, ref_cfg = _build(None, world, pattern)
    ref.init_states()
    tp_model, tp_cfg = _build(enable_sp, world, pattern)
    tp_model.load_state_dict(ref.state_dict())
    parallel_dims = ParallelDims(
        dp_replicate=1,
        dp_shard=1,
        cp=1,
        tp=world,
        pp=1,
        ep=1,
        world_size=world,
        spmd_backend="partial_dtensor",  # NemotronH's (sharding.check_parallelism)
    )
    parallel_dims.build_mesh()
    tp_model.parallelize(parallel_dims)

    vocab = ref_cfg.vocab_size
    batch = _batch(vocab, seq_len)
    ref_losses = _train(ref, steps, batch, vocab)
    tp_losses = _train(tp_model, steps, batch, vocab)

    ref_sd = ref.state_dict()
    tp_sd = tp_model.state_dict()
    weight_rel = {
        name: _rel(_full(value).detach(), ref_sd[name]) for name, value in tp_sd.items()
    }
    placements = {
        name: str(value.placements)
        for name, value in tp_sd.items()
        if isinstance(value, DTensor)
    }

    # HF export: sharded → hub tensors (gathered) vs an unsharded model holding the
    # same (gathered) weights; then load the export back into the sharded layout.
    gathered = {name: _full(v).detach().clone() for name, v in tp_sd.items()}
    plain, _ = _build(None, world, pattern)
    plain.load_state_dict(gathered)
    adapter = NemotronHStateDictAdapter(tp_cfg, None)
    tp_hf = adapter.to_hf(tp_sd)
    plain_hf = NemotronHStateDictAdapter(ref_cfg, None).to_hf(plain.state_dict())
    # (gathers in the same order on every rank: no set iteration)
    tp_hf_full = {hub: _full(value) for hub, value in tp_hf.items()}
    export_mismatch = sorted(
        hub
        for hub in sorted(set(tp_hf_full) | set(plain_hf))
        if hub not in tp_hf_full
        or hub not in plain_hf
        or not torch.equal(tp_hf_full[hub], plain_hf[hub])
    )
    reloaded = adapter.from_hf(tp_hf)
    reload_mismatch = sorted(
        name
        for name, value in tp_sd.items()
        if type(reloaded[name]) is not type(value)
        or (
            isinstance(value, DTensor)
            and tuple(reloaded[name].placements) != tuple(value.placements)
        )
        or not torch.equal(_full(reloaded[name]), gathered[name])
    )
    # The same through TorchTitan's checkpointer (last_save_in_hf, then
    # initial_load_in_hf into a fresh sharded model): DCP writes the files.
    manager = SimpleNamespace(
        sd_adapter=adapter, states={"model": ModelWrapper(tp_model)}, pg=None, stager=None
    )
    CheckpointManager.dcp_save(
        manager, tp_sd, checkpoint_id=out_dir, async_mode=AsyncMode.DISABLED, to_hf=True
    )
    dist.barrier()
    written = {}
    for file in sorted(glob.glob(os.path.join(out_dir, "*.safetensors"))):
        written.update(load_file(file))
    file_mismatch = sorted(
        hub
        for hub in sorted(set(written) | set(plain_hf))
        if hub not in written
        or hub not in plain_hf
        or not torch.equal(written[hub], plain_hf[hub])
    )
    fresh, _ = _build(enable_sp, world, pattern)
    torch.manual_seed(1 + rank)  # other weights, different per rank
    fresh.init_states()
    fresh.parallelize(parallel_dims)
    fresh_manager = SimpleNamespace(
        sd_adapter=NemotronHStateDictAdapter(tp_cfg, None),
        states={"model": ModelWrapper(fresh)},
        pg=None,
        stager=None,
    )
    CheckpointManager.dcp_load(
        fresh_manager,
        fresh_manager.states["model"].state_dict(),
        checkpoint_id=out_dir,
        from_hf=True,
        from_quantized=False,
    )
    load_mismatch = sorted(
        name
        for name, value in fresh.state_dict().items()
        if not torch.equal(_full(value), gathered[name])
    )
    return {
        "file_mismatch": file_mismatch,
        "load_mismatch": load_mismatch,
        "ref_losses": ref_losses,
        "tp_losses": tp_losses,
        "weight_rel": weight_rel,
        "placements": placements,
        "export_mismatch": export_mismatch,
        "reload_mismatch": reload_mismatch,
        "hub_names": len(plain_hf),
    }


def worker(
    rank: int,
    world: int,
    rendezvous: str,
    enable_sp: bool,
    steps: int,
    seq_len: int,
    results,
) -> None:
    torch.set_num_threads(1)
    cpu_compat.apply()  # TorchTitan's meshes default to "cuda"
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world
    )
    try:
        out_dir = os.path.join(os.path.dirname(rendezvous), "hf")
        out = run(rank, world, enable_sp, steps, seq_len, out_dir)
        if rank == 0:
            results.update(out)
    finally:
        dist.destroy_process_group()
