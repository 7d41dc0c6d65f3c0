"""Which parameter elements each rank stores, and what each FSDP unit all-gathers.

Two sources with one result type, so the memory and communication estimates do
not care which produced it:

* ``measure(model)``: read off a model the package has really parallelized (on
  the meta device): every parameter's DTensor placements give each rank's local
  shard; every FSDP unit's param groups give what its all-gather moves and on
  which mesh. This is the dry run's source: it sees whatever TP/EP/FSDP layout
  ``parallelize_nemotronh`` applies, including layouts added after this file.
* ``analytic(model, model_config, layout)``: the same from global shapes and the
  layout's rules, for layouts the package refuses today (benchmarks/layouts.py).
  Rules: routed experts split over ``ep`` (EP without TP) or over ``tp`` (TP
  without EP); every other parameter except RMSNorm weights of blocks/the final
  norm and the router gate splits over ``tp``; then FSDP splits all of it over
  ``fsdp`` (experts under EP: ``efsdp``), replicated ``dp_replicate`` times. PP:
  stage 0 (embeddings + the first ``layers/pp`` blocks).
"""

from collections import Counter
from dataclasses import dataclass, field

from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from ..model.pattern import ATTENTION, MAMBA
from .layout import Layout

CATEGORIES = ("embeddings", "mamba", "attention", "experts", "dense")
_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass
class Group:
    """Parameters moved by one FSDP all-gather / reduce-scatter."""

    numel: int  # gathered elements: unsharded over FSDP, still local to EP/TP
    shard: int  # FSDP shard degree (the fsdp or efsdp mesh size)
    replicate: int  # HSDP replicas (1 for FSDP)
    mesh: str  # the shard axis: "fsdp", or "efsdp" for experts under EP
    categories: Counter = field(default_factory=Counter)
    trainable: int = 0  # gathered elements that train (all but a LoRA base)
    nf4_numel: int = 0  # gathered elements stored in NF4 (FSDP-QLoRA's base)
    nf4_bytes: int = 0  # their gathered bytes (4-bit codes, scalers, factors)

    def gather_bytes(self, param_bytes: int) -> int:
        """Bytes this group's all-gather delivers: NF4 elements as NF4 (torchao's
        hooks gather the packed tensors), the rest in the param dtype."""
        return (self.numel - self.nf4_numel) * param_bytes + self.nf4_bytes


@dataclass
class Unit:
    """One FSDP module: gathered before its forward (and again before its
    backward when it reshards after forward)."""

    name: str
    groups: list[Group]
    reshard_after_forward: bool

    @property
    def numel(self) -> int:
        return sum(g.numel for g in self.groups)


@dataclass
class Shards:
    local_numel: Counter  # rank 0's stored parameter elements, by category
    rank_numel: list[int]  # stored elements per rank (rank 0 first)
    total_numel: int  # parameters of the whole model
    units: list[Unit]
    source: str  # "measured" or "analytic"
    # A LoRA/QLoRA job's frozen base (empty when every parameter trains):
    # rank 0's stored bytes by category, by storage dtype ("bfloat16", "nf4", ...),
    # and the trainable local elements by category.
    frozen_bytes: Counter = field(default_factory=Counter)
    frozen_by_dtype: Counter = field(default_factory=Counter)
    trainable_numel: Counter = field(default_factory=Counter)
    nf4_transient: int = 0  # bytes of the largest NF4 tensor dequantized (bf16)
    # QLoRA with FSDP over several ranks: NF4 bytes each rank stores whole (the
    # tensors FSDP cannot split into whole blocks, or all under TP/EP/HSDP)
    nf4_replicated: int = 0


def clean_fqn(fqn: str) -> str:
    for wrapper in _WRAPPERS:
        fqn = fqn.replace(wrapper, "")
    return fqn


def category(fqn: str, layer_types: str) -> str:
    """embeddings (tok_embeddings, lm_head), experts (routed), mamba, attention
    (the mixers of M and * blocks), dense (norms, router, shared expert, MLP)."""
    fqn = clean_fqn(fqn)
    if fqn.startswith(("tok_embeddings.", "lm_head.")):
        return "embeddings"
    if ".inner_experts." in fqn:
        return "experts"
    parts = fqn.split(".")
    if parts[0] == "layers" and parts[2] == "mixer":
        kind = layer_types[int(parts[1])]
        if kind == MAMBA:
            return "mamba"
        if kind == ATTENTION:
            return "attention"
    return "dense"


def _rank_numels(p: DTensor, world: int) -> list[int]:
    """Local elements of ``p`` on every global rank (0 where its mesh has none)."""
    mesh = p.device_mesh
    ranks = mesh.mesh
    out = [0] * world
    for r in ranks.flatten().tolist():
        coord = [int(c) for c in (ranks == r).nonzero()[0].tolist()]
        shape, _ = _compute_local_shape_and_global_offset(
            p.shape, mesh.shape, coord, p.placements
        )
        n = 1
        for s in shape:
            n *= s
        out[r] = n
    return out


def measure(
    model: nn.Module, layer_types: str, world: int, nf4: dict | None = None
) -> Shards:
    """``Shards`` of a parallelized (meta) model; see the module docstring.
    ``nf4``: {id(parameter): scaler block size} of the frozen tensors a QLoRA
    job stores in NF4 (``qlora.transform.nf4_targets``), sized as NF4."""
    nf4 = nf4 or {}
    local, rank_numel, total = Counter(), [0] * world, 0
    frozen_bytes, frozen_by_dtype, trainable = Counter(), Counter(), Counter()
    lean = any(not p.requires_grad for p in model.parameters()) and any(
        p.requires_grad for p in model.parameters()
    )
    names, transient, nf4_replicated = {}, 0, 0
    for fqn, p in model.named_parameters():
        cat = category(fqn, layer_types)
        names[id(p)] = (clean_fqn(fqn), cat)
        total += p.numel()
        n_local = p.to_local().numel() if isinstance(p, DTensor) else p.numel()
        if isinstance(p, DTensor):
            local[cat] += n_local
            for r, n in enumerate(_rank_numels(p, world)):
                rank_numel[r] += n
        else:
            local[cat] += n_local
            rank_numel = [n + p.numel() for n in rank_numel]
        if not lean or p.requires_grad:
            trainable[cat] += n_local
        elif id(p) in nf4:
            from ..qlora.nf4 import nf4_nbytes  # QLoRA jobs only (imports torchao)

            nbytes = nf4_nbytes(n_local, nf4[id(p)])
            frozen_bytes[cat] += nbytes
            frozen_by_dtype["nf4"] += nbytes
            if world > 1 and not isinstance(p, DTensor):
                nf4_replicated += nbytes
            transient = max(transient, p.numel() * 2)
        else:
            nbytes = n_local * p.element_size()
            frozen_bytes[cat] += nbytes
            frozen_by_dtype[str(p.dtype).removeprefix("torch.")] += nbytes
    units, seen = [], set()
    for mod_name, module in model.named_modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()  # one state for fully_shard([a, b])
        if id(state) in seen:
            continue
        seen.add(id(state))
        groups, reshard = [], False
        for pg in state._fsdp_param_groups:
            reshard = reshard or pg.post_forward_mesh_info is not None
            info = pg.mesh_info
            axis = info.mesh.mesh_dim_names[info.shard_mesh_dim]
            g = Group(
                0, info.shard_mesh_size, getattr(info, "replicate_mesh_size", 1), axis
            )
            for fp in pg.fsdp_params:
                _, cat = names[id(fp.sharded_param)]
                n = fp._orig_size.numel()
                g.numel += n
                g.categories[cat] += n
                if fp.sharded_param.requires_grad:
                    g.trainable += n
                if id(fp.sharded_param) in nf4:
                    from ..qlora.nf4 import nf4_nbytes

                    g.nf4_numel += n
                    g.nf4_bytes += nf4_nbytes(n, nf4[id(fp.sharded_param)])
            groups.append(g)
        if groups:
            units.append(Unit(clean_fqn(mod_name) or "model", groups, reshard))
    shards = Shards(local, rank_numel, total, units, "measured")
    if lean:
        shards.frozen_bytes, shards.frozen_by_dtype = frozen_bytes, frozen_by_dtype
        shards.trainable_numel, shards.nf4_transient = trainable, transient
        shards.nf4_replicated = nf4_replicated
    return shards


def _tp_split(fqn: str, cat: str, layout: Layout) -> int:
    """How many ways TP/EP split a parameter before FSDP (analytic rules)."""
    if cat == "experts":
        return layout.ep if layout.ep > 1 else layout.tp
    tail = clean_fqn(fqn)
    replicated = tail.endswith("norm.weight") and ".mixer." not in tail
    if replicated or ".router." in tail:
        return 1
    return layout.tp


def analytic(model: nn.Module, layer_types: str, layout: Layout) -> Shards:
    """``Shards`` of an unparallelized (meta) model under ``layout``'s rules."""
    n_stage = -(-len(layer_types) // layout.pp)
    stage0 = {str(i) for i in range(n_stage)}
    units: dict[str, Unit] = {}
    local, total = Counter(), 0
    for fqn, p in model.named_parameters():
        fqn = clean_fqn(fqn)
        cat = category(fqn, layer_types)
        total += p.numel()
        parts = fqn.split(".")
        if parts[0] == "layers":
            unit_name = f"layers.{parts[1]}"
            if parts[1] not in stage0:
                continue
        elif parts[0] == "tok_embeddings":
            unit_name = "tok_embeddings"
        else:  # norm, lm_head: one unit, on the last stage (stage 0 when pp == 1)
            if layout.pp > 1:
                continue
            unit_name = "norm+lm_head"
        experts = cat == "experts" and layout.ep > 1
        shard = layout.efsdp if experts else layout.fsdp
        n = p.numel() // _tp_split(fqn, cat, layout)
        local[cat] += -(-n // shard)
        unit = units.setdefault(
            unit_name, Unit(unit_name, [], unit_name != "norm+lm_head")
        )
        axis = "efsdp" if experts else "fsdp"
        g = next((g for g in unit.groups if g.mesh == axis), None)
        if g is None:
            g = Group(0, shard, layout.dp_replicate, axis)
            unit.groups.append(g)
        g.numel += n
        g.trainable += n
        g.categories[cat] += n
    per_rank = sum(local.values())
    return Shards(
        local, [per_rank] * layout.world, total, list(units.values()), "analytic"
    )
