"""Load a hub checkpoint straight into a QLoRA model: NF4 targets quantized one
tensor at a time (a layer's experts as one bank), never the whole bf16 base.

``load_nf4_base(model, path)`` takes a LoRA model built on the meta device and
allocates it on ``device``: every non-target tensor (embedding, norms, conv,
``A_log``, ``D``, ``dt_bias``, router in fp32) is read in place; each NF4
target is read (an expert bank: its E hub tensors copied into one [E, F, D]
buffer), quantized with ``quantize_in_chunks`` (bitwise ``to_nf4``, without
its whole-tensor temporaries) and freed. Peak: the NF4 total, the non-target
weights and one bf16 bank (plus one expert's rows). The adapters are
initialised as TorchTitan initialises them (A random, B = 0), so step 0 is the
(quantized) released model. The fused hub ``in_proj`` is read once per layer
and split into its parts before they are quantized.
"""

import os
from collections import defaultdict

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torchtitan.protocols.module import Module

from ..hf.errors import CheckpointMismatchError
from ..hf.files import check_finite, open_safetensors, read_stored, scan_checkpoint
from ..hf.hub import MODEL_FILES, local_dir
from ..hf.naming import is_expert_weight, keep_fp32, ours_to_hub, packed_part, packed_parts
from .transform import mark_nf4, nf4_targets, NF4Mamba2InProj
from ..model.mamba2 import Mamba2InProj
from .nf4 import NF4Tensor, quantize_in_chunks, require_torchao


class _Reader:
    """Hub tensors by name from the checkpoint's files (one open file at a time)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.stored = scan_checkpoint(path)
        self._file, self._handle = None, None

    def read(self, hub_name: str) -> torch.Tensor:
        entry = self.stored.get(hub_name)
        if entry is None:
            files = sorted({os.path.basename(e.file) for e in self.stored.values()})
            named = ", ".join(files[:3]) + (f" (+{len(files) - 3} more)" if len(files) > 3 else "")
            raise CheckpointMismatchError(
                f"{self.path}: no tensor {hub_name!r} in {named or 'its files'} "
                "(a damaged header, or a checkpoint of another architecture)"
            )
        if entry.file != self._file:
            self.close()
            self._handle = open_safetensors(entry.file).__enter__()
            self._file = entry.file
        t = read_stored(self._handle, entry)
        check_finite(t, hub_name, entry.file)
        return t

    def close(self):
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._file, self._handle = None, None


def _set(module: nn.Module, name: str, value: torch.Tensor, trainable=False):
    module._parameters[name] = nn.Parameter(value, requires_grad=trainable)


@torch.no_grad()
def load_nf4_base(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    lm_head: bool | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    dequant_chunk_experts: int | None = None,
    seed: int = 0,
    on_read=None,
) -> nn.Module:
    """Allocate a meta-built LoRA model on ``device`` with its base from the hub
    checkpoint at ``path`` (see the module doc); ``lm_head``: None takes the
    model config's ``nf4_lm_head``. ``on_read(tensor)`` sees every tensor read
    from disk (the tests' allocation tracker). Returns ``model``."""
    require_torchao()
    path = local_dir(path, MODEL_FILES)
    if lm_head is None:
        lm_head = bool(getattr(model.config, "nf4_lm_head", False))
    reader = _Reader(path)
    on_read = on_read or (lambda t: None)
    targets = {
        f"{fqn}.{n}" if fqn else n: (module, n)
        for fqn, module, names in nf4_targets(model, lm_head)
        for n in names
    }
    # Non-targets: allocated (adapters in fp32, router in fp32, the rest in dtype).
    for fqn, p in list(model.named_parameters()):
        if fqn in targets:
            continue
        owner_name, _, leaf = fqn.rpartition(".")
        owner = model.get_submodule(owner_name)
        adapter = ".lora_a." in f".{fqn}" or ".lora_b." in f".{fqn}"
        dt = torch.float32 if adapter or keep_fp32(fqn) else dtype
        _set(owner, leaf, torch.empty(p.shape, dtype=dt, device=device), adapter)
    for fqn, b in list(model.named_buffers()):
        owner_name, _, leaf = fqn.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner._buffers[leaf] = torch.empty(b.shape, dtype=b.dtype, device=device)
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, Module):
            m._init_self_buffers()
        if hasattr(m, "lora_a"):  # adapters as TorchTitan initialises them
            m.lora_a.init_states()
            m.lora_b.init_states()
    try:
        _read_base(model, reader, targets, device, dtype, on_read)
    finally:
        reader.close()
    for module, _ in targets.values():
        mark_nf4(module, dequant_chunk_experts)
    for m in model.modules():
        if type(m) is Mamba2InProj:
            m.__class__ = NF4Mamba2InProj
    return model


_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def _clean(fqn: str) -> str:
    for w in _WRAPPERS:
        fqn = fqn.replace(w, "")
    return fqn


@torch.no_grad()
def fill_nf4_base(
    model: nn.Module,
    path: str | os.PathLike | None,
    *,
    lm_head: bool | None = None,
    seed: int = 0,
) -> None:
    """Fill the NF4 placeholders of a trainer-built model (``prepare_nf4`` on
    meta, then FSDP, ``to_empty`` and init): from the hub checkpoint at
    ``path`` (every other base tensor too; FSDP's DTensors get their shards),
    or, with ``path`` None, from each target's own initialiser (a random base,
    seeded by ``seed``, for runs without a checkpoint)."""
    require_torchao()
    if lm_head is None:
        lm_head = bool(getattr(model.config, "nf4_lm_head", False))
    targets = {
        _clean(f"{fqn}.{n}" if fqn else n): (module, n)
        for fqn, module, names in nf4_targets(model, lm_head)
        for n in names
    }
    if path is None:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            for fqn, (module, name) in targets.items():
                shape = module.__dict__.get("nf4_shapes", {}).get(name)
                placeholder = _local(getattr(module, name))
                shape = shape or tuple(placeholder.shape)
                device = placeholder.quantized_data.device
                value = torch.empty(shape, dtype=torch.bfloat16, device=device)
                module._param_init[name](value)
                put_nf4(module, name, value, fqn)
                del value
        finally:
            torch.random.set_rng_state(gen_state)
        return
    reader = _Reader(local_dir(path, MODEL_FILES))
    try:
        device = next(
            p.device for p in model.parameters() if not isinstance(p, NF4Tensor)
        )
        _read_base(model, reader, targets, device, torch.bfloat16, lambda t: None)
    finally:
        reader.close()


def _read_base(model, reader, targets, device, dtype, on_read):
    params = {_clean(k): v for k, v in model.named_parameters()}
    packed = defaultdict(list)  # hub name -> our part names
    for fqn in params:
        if ".lora_a." in f".{fqn}" or ".lora_b." in f".{fqn}":
            continue
        part = packed_part(fqn)
        if part is not None:
            packed[part[0]].append(fqn)
            continue
        if is_expert_weight(fqn):
            shape = _full_shape(targets, fqn, params[fqn])
            value = _read_bank(reader, fqn, shape, dtype, device, on_read)
        else:
            value = reader.read(ours_to_hub(fqn))
            on_read(value)
        _assign(model, targets, fqn, value, params)
        del value
    for hub, ours in packed.items():
        full = reader.read(hub)
        on_read(full)
        order = packed_parts(hub)
        row = 0
        for name in order:
            rows = _full_shape(targets, name, params[name])[0]
            if name in params:
                _assign(model, targets, name, full[row : row + rows], params)
            row += rows
        del full


def _read_bank(reader, fqn, shape, dtype, device, on_read):
    """A layer's experts [E, F, D] from their E hub tensors, in one buffer."""
    template = ours_to_hub(fqn)
    bank = torch.empty(shape, dtype=dtype, device=device)
    on_read(bank)
    for e in range(shape[0]):
        expert = reader.read(template.format(expert=e))
        on_read(expert)
        bank[e].copy_(expert)
        del expert
    return bank


def _full_shape(targets, fqn, p) -> tuple:
    """The model's shape of ``fqn``: an NF4 placeholder holds the 2-D view of a
    3-D bank; ``prepare_nf4`` kept the original shape on the module."""
    target = targets.get(fqn)
    if target is not None:
        module, name = target
        shape = module.__dict__.get("nf4_shapes", {}).get(name)
        if shape is not None:
            return tuple(shape)
    return tuple(p.shape)


def _assign(model, targets, fqn, value, params):
    target = targets.get(fqn)
    p = params[fqn]
    if tuple(value.shape) != _full_shape(targets, fqn, p):
        raise ValueError(
            f"{fqn}: the checkpoint's tensor has shape {tuple(value.shape)}, the "
            f"model's {_full_shape(targets, fqn, p)}"
        )
    if target is not None:
        module, name = target
        local = _local(p)
        device = local.quantized_data.device if isinstance(local, NF4Tensor) else p.device
        device = value.device if device.type == "meta" else device
        put_nf4(module, name, value.to(device=device, dtype=torch.bfloat16), fqn)
    elif isinstance(p, DTensor):
        full = value.to(device=p.device, dtype=p.dtype)
        p.copy_(distribute_tensor(full, p.device_mesh, p.placements))
    else:
        p.copy_(value)


def _local(p: torch.Tensor) -> torch.Tensor:
    """An FSDP-sharded parameter's local shard (an NF4 one: torchao's NF4Tensor)."""
    return p._local_tensor if isinstance(p, DTensor) else p


def put_nf4(module: nn.Module, name: str, value: torch.Tensor, fqn: str) -> None:
    """``module.name`` (an NF4 target) := the NF4 quantization of ``value`` (its
    full bf16 tensor), with the placeholder's scaler block. A replicated
    target's parameter is replaced; an FSDP-sharded one (a DTensor of NF4 row
    shards) gets this rank's row chunk copied into its shard in place: NF4
    cannot be quantized shard by shard (the double quantization's mean is the
    whole tensor's), so each rank quantizes the whole tensor and keeps its rows."""
    p = module._parameters[name]
    local = _local(p)
    scaler_block = getattr(local, "scaler_block_size", None)
    if not isinstance(p, DTensor):
        q = quantize_in_chunks(value, fqn, scaler_block=scaler_block)
        _set(module, name, q)
        return
    mesh, placements = p.device_mesh, p.placements
    if mesh.ndim != 1 or placements[0] != Shard(0):
        raise ValueError(
            f"NF4: {fqn} is sharded as {placements} on a {mesh.ndim}-D mesh; "
            "only FSDP's Shard(0) on one mesh dimension is supported"
        )
    q = quantize_in_chunks(value, fqn, scaler_block=scaler_block)
    chunk = q.split(q.shape[0] // mesh.size())[mesh.get_local_rank()]
    if chunk.shape != local.shape:
        raise ValueError(
            f"NF4: {fqn}'s shard has shape {tuple(local.shape)}, its rows of the "
            f"checkpoint's tensor {tuple(chunk.shape)}"
        )
    local.copy_(chunk)  # codes, scalers and factors: the storage FSDP gathers
    # torchao's empty_like (``to_empty``) leaves the tensors every shard shares
    # (the scalers' mean, the code book) on meta: give the shard its own.
    for attr in ("scaler_mean", "nf4"):
        if getattr(local, attr).is_meta:
            setattr(local, attr, getattr(chunk, attr).clone())
