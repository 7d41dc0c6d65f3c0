"""Tensor names: ours ↔ the hub's, and every on-disk spelling → the hub's.

Hub format (nvidia's checkpoints, and transformers 5.x ``save_pretrained``):
``backbone.embeddings.weight``, ``backbone.layers.{i}.norm.weight``,
``backbone.layers.{i}.mixer.*``, ``backbone.norm_f.weight``, ``lm_head.weight``;
MoE experts one 2-D tensor per expert (``mixer.experts.{k}.up_proj.weight``).
Inside a layer the mixer's own names are the hub's already, except the MoE router
(``router.gate`` ↔ ``gate``), the correction bias (``expert_bias_E`` ↔
``gate.e_score_correction_bias``) and the 3-D expert weights.

The Mamba2 mixer holds the hub's packed ``in_proj`` (rows z | x | B | C | dt) and
``conv1d`` (channels x | B | C) as one tensor per part (``in_proj.z.weight``, ...,
``conv1d.x.weight``, ...), so tensor parallelism can shard each part by head:
``PACKED`` names the parts of each packed hub tensor, in order.

The multi-token-prediction block (Super, Ultra) has no ``backbone.`` prefix on the
hub: ``mtp.layers.{i}.*``, its sub-layers flattened, the first also holding
``enorm`` / ``hnorm`` / ``eh_proj`` and the last ``final_layernorm``; ours has the
same layout (``model/mtp.py``), so only the mixer renames apply.

Other spellings seen on disk, accepted when reading: transformers' in-memory names
(``model.`` prefix) written by ``save_pretrained(save_original_format=False)``, with
3-D experts ``model.layers.{i}.mixer.experts.up_proj`` [E, F, D].
"""

import re

HUB_PREFIX = "backbone."
# The multi-token-prediction block's tensors, ours and the hub's alike.
MTP_PREFIX = "mtp."

_TOP_LEVEL = {
    "tok_embeddings.weight": "backbone.embeddings.weight",
    "norm.weight": "backbone.norm_f.weight",
    "lm_head.weight": "lm_head.weight",
}
_TOP_LEVEL_FROM_HUB = {v: k for k, v in _TOP_LEVEL.items()}

# inside ``layers.{i}.mixer.``: ours → hub (everything else is the same name)
_MIXER_RENAMES = {
    "router.gate.weight": "gate.weight",
    "expert_bias_E": "gate.e_score_correction_bias",
}
_MIXER_RENAMES_FROM_HUB = {v: k for k, v in _MIXER_RENAMES.items()}

# inside ``layers.{i}.mixer.``: hub packed tensor → our parts, in packing order
PACKED = {
    f"{module}.{kind}": tuple(f"{module}.{part}.{kind}" for part in parts)
    for module, parts in (
        ("in_proj", ("z", "x", "B", "C", "dt")),
        ("conv1d", ("x", "B", "C")),
    )
    for kind in ("weight", "bias")
}
_PACKED_FROM_PART = {
    part: packed for packed, parts in PACKED.items() for part in parts
}

# our 3-D expert weight → the per-expert hub matrix it holds
EXPERT_WEIGHTS = {
    "routed_experts.inner_experts.w1_EFD": "up_proj",
    "routed_experts.inner_experts.w2_EDF": "down_proj",
}
_EXPERT_WEIGHTS_FROM_HUB = {v: k for k, v in EXPERT_WEIGHTS.items()}

# The router (gate weight and correction bias) stays fp32 in any checkpoint dtype:
# it decides which experts run (top-k of sigmoid + bias), so rounding changes the
# routing. transformers keeps both in fp32 (the gate from 5.24 on) and writes them
# so; a checkpoint holding a bf16 gate (the hub's, transformers <= 5.23) loads too.
FP32_SUFFIXES = (
    ".mixer.gate.weight",
    ".mixer.gate.e_score_correction_bias",
    ".mixer.router.gate.weight",
    ".mixer.expert_bias_E",
)

# Block stacks, ours → hub: the main layers and the MTP block's layers.
_STACKS = {"layers": f"{HUB_PREFIX}layers", "mtp.layers": "mtp.layers"}
_STACKS_FROM_HUB = {v: k for k, v in _STACKS.items()}
_OURS_LAYER = re.compile(r"^((?:mtp\.)?layers)\.(\d+)\.(.+)$")
_HUB_LAYER = re.compile(r"^(backbone\.layers|mtp\.layers)\.(\d+)\.(.+)$")
# What a block holds: its norm and mixer; an MTP layer also the fusion of the
# shifted embedding with the previous hidden state (first) or the final norm (last).
_BLOCK_PARTS = ("norm.", "mixer.")
_MTP_BLOCK_PARTS = _BLOCK_PARTS + ("enorm.", "hnorm.", "eh_proj.", "final_layernorm.")


def _block_part_ok(stack: str, rest: str) -> bool:
    return rest.startswith(_MTP_BLOCK_PARTS if stack == "mtp.layers" else _BLOCK_PARTS)
_HUB_EXPERT = re.compile(r"^mixer\.experts\.(\d+)\.(up_proj|down_proj)\.weight$")
# 3-D experts as transformers holds them in memory
_STACKED_EXPERTS = re.compile(
    r"^(?:model|backbone)\.layers\.(\d+)\.mixer\.experts\.(up_proj|down_proj)(?:\.weight)?$"
)


def is_mtp(name: str) -> bool:
    """True for a tensor of the MTP block (our name or the hub's)."""
    return name.startswith(MTP_PREFIX)


def is_expert_weight(ours: str) -> bool:
    return ours.rsplit(".mixer.", 1)[-1] in EXPERT_WEIGHTS


def packed_part(ours: str) -> tuple[str, str] | None:
    """(hub name of the packed tensor, our mixer-relative part name) if ``ours``
    is one part of a packed Mamba2 tensor, else None."""
    match = _OURS_LAYER.match(ours)
    if match is None:
        return None
    stack, layer, rest = match.groups()
    inner = rest.removeprefix("mixer.")
    if inner == rest or inner not in _PACKED_FROM_PART:
        return None
    return f"{_STACKS[stack]}.{layer}.mixer.{_PACKED_FROM_PART[inner]}", inner


def packed_parts(hub: str) -> list[str] | None:
    """Our names of the parts of a packed hub tensor, in order; None otherwise."""
    match = _HUB_LAYER.match(hub)
    if match is None:
        return None
    stack, layer, rest = match.groups()
    parts = PACKED.get(rest.removeprefix("mixer."))
    if parts is None or not rest.startswith("mixer."):
        return None
    return [f"{_STACKS_FROM_HUB[stack]}.{layer}.mixer.{part}" for part in parts]


def keep_fp32(name: str) -> bool:
    """True for the router tensors, which stay fp32 whatever the checkpoint dtype
    (our names or the hub's)."""
    return name.endswith(FP32_SUFFIXES)


def ours_to_hub(ours: str) -> str:
    """The hub name of one of our tensors. For a 3-D expert weight this is a
    template with ``{expert}`` to fill in per expert."""
    if ours in _TOP_LEVEL:
        return _TOP_LEVEL[ours]
    match = _OURS_LAYER.match(ours)
    if match is None or not _block_part_ok(match.group(1), match.group(3)):
        raise KeyError(f"{ours!r} is not a NemotronH parameter or buffer name")
    stack, layer, rest = match.groups()
    if rest.startswith("mixer."):
        inner = rest.removeprefix("mixer.")
        if inner in _PACKED_FROM_PART:
            rest = "mixer." + _PACKED_FROM_PART[inner]
        elif inner in EXPERT_WEIGHTS:
            rest = f"mixer.experts.{{expert}}.{EXPERT_WEIGHTS[inner]}.weight"
        else:
            rest = "mixer." + _MIXER_RENAMES.get(inner, inner)
    return f"{_STACKS[stack]}.{layer}.{rest}"


def hub_to_ours(hub: str) -> tuple[str, int | None]:
    """(our name, expert index or None) for a hub tensor name."""
    if hub in _TOP_LEVEL_FROM_HUB:
        return _TOP_LEVEL_FROM_HUB[hub], None
    match = _HUB_LAYER.match(hub)
    if match is None:
        raise KeyError(f"{hub!r} is not a NemotronH hub tensor name")
    stack, layer, rest = match.groups()
    stack = _STACKS_FROM_HUB[stack]
    if not _block_part_ok(stack, rest):
        raise KeyError(f"{hub!r} is not a NemotronH hub tensor name")
    expert = _HUB_EXPERT.match(rest)
    if expert is not None:
        index, proj = expert.groups()
        return f"{stack}.{layer}.mixer.{_EXPERT_WEIGHTS_FROM_HUB[proj]}", int(index)
    if rest.startswith("mixer."):
        inner = rest.removeprefix("mixer.")
        rest = "mixer." + _MIXER_RENAMES_FROM_HUB.get(inner, inner)
    return f"{stack}.{layer}.{rest}", None


def hub_names_on_disk(key: str, shape: tuple[int, ...]) -> list[tuple[str, int | None]]:
    """The hub names a tensor stored on disk as ``key`` provides, each with the index
    along dim 0 it comes from (None: the whole tensor).

    ``model.layers.3.mixer.experts.up_proj`` [E, F, D] provides E hub tensors
    ``backbone.layers.3.mixer.experts.{k}.up_proj.weight``; ``model.x`` is ``backbone.x``
    (``lm_head`` has no prefix in either spelling).
    """
    stacked = _STACKED_EXPERTS.match(key)
    if stacked is not None and len(shape) == 3:
        layer, proj = stacked.groups()
        return [
            (f"{HUB_PREFIX}layers.{layer}.mixer.experts.{k}.{proj}.weight", k)
            for k in range(shape[0])
        ]
    if key.startswith("model."):
        key = HUB_PREFIX + key.removeprefix("model.")
    return [(key, None)]
