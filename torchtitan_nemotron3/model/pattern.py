"""The ``hybrid_override_pattern``: one character per layer says which mixer it holds.

NemotronH is a stack of single-mixer blocks; the pattern is the architecture.
Megatron writes two extra symbols into its patterns, and transformers 5.x writes a
list (``layers_block_type``) instead of a string; both forms are accepted here so a
config from any of the three sources means one thing.
"""

from collections.abc import Sequence

MAMBA, ATTENTION, MLP, MOE = "M", "*", "-", "E"
LAYER_SYMBOLS = {MAMBA: "Mamba2", ATTENTION: "attention", MLP: "MLP", MOE: "MoE"}

# transformers' ``layers_block_type`` names (plus the legacy "mamba"/"attention"
# spellings older configs carry), and back.
HF_BLOCK_TYPES = {
    "linear_attention": MAMBA,
    "mamba": MAMBA,
    "full_attention": ATTENTION,
    "attention": ATTENTION,
    "mlp": MLP,
    "moe": MOE,
}
SYMBOL_TO_HF_BLOCK_TYPE = {
    MAMBA: "linear_attention",
    ATTENTION: "full_attention",
    MLP: "mlp",
    MOE: "moe",
}

# Megatron's pipeline-stage separator carries no architecture: the canonical
# pattern drops it; ``pipeline_segments`` keeps where it was.
_PIPELINE_SEPARATOR = "|"
# Megatron's multi-token-prediction separator: what follows it describes MTP
# layers, which this package does not implement, so it is rejected.
_MTP_SEPARATOR = "/"


def parse_hybrid_pattern(
    pattern: str | Sequence[str], num_layers: int | None = None
) -> str:
    """Return the canonical pattern: a string over ``M * - E``, one char per layer.

    Accepts a pattern string (``"M-M*E"``; ``|`` pipeline-stage separators are
    ignored) or transformers' ``layers_block_type`` list. Raises ``ValueError``
    naming the offending character and its position, or both lengths when
    ``num_layers`` disagrees with the pattern.
    """
    if isinstance(pattern, str):
        symbols = []
        for pos, char in enumerate(pattern):
            if char in LAYER_SYMBOLS:
                symbols.append(char)
            elif char == _PIPELINE_SEPARATOR:
                continue
            elif char == _MTP_SEPARATOR:
                raise ValueError(
                    f"hybrid_override_pattern {pattern!r}: '/' at position {pos} starts "
                    "Megatron multi-token-prediction (MTP) layers, which are not "
                    "implemented; remove the MTP part of the pattern"
                )
            else:
                raise ValueError(
                    f"hybrid_override_pattern {pattern!r}: invalid character {char!r} "
                    f"at position {pos}; expected one of 'M' (Mamba2), '*' (attention), "
                    "'-' (MLP), 'E' (MoE), or '|' (pipeline-stage separator)"
                )
        canonical = "".join(symbols)
    else:
        symbols = []
        for pos, block_type in enumerate(pattern):
            if block_type not in HF_BLOCK_TYPES:
                raise ValueError(
                    f"layers_block_type[{pos}] = {block_type!r} is not a known block "
                    f"type; expected one of {sorted(HF_BLOCK_TYPES)}"
                )
            symbols.append(HF_BLOCK_TYPES[block_type])
        canonical = "".join(symbols)

    if not canonical:
        raise ValueError("hybrid_override_pattern is empty: the model needs layers")
    if num_layers is not None and len(canonical) != num_layers:
        raise ValueError(
            f"hybrid_override_pattern has {len(canonical)} layers but "
            f"num_hidden_layers is {num_layers}"
        )
    return canonical


def pipeline_segments(pattern: str | Sequence[str]) -> tuple[int, ...] | None:
    """Layers per ``|``-separated segment of a Megatron pattern (``"ME|M*|E-"`` →
    ``(2, 2, 2)``), ``None`` when it has no ``|``. Megatron's meaning: segment i is
    pipeline (virtual) stage i; empty segments are kept (an end segment may hold
    only the embeddings or only norm + lm_head)."""
    if not isinstance(pattern, str) or _PIPELINE_SEPARATOR not in pattern:
        return None
    return tuple(
        len(parse_hybrid_pattern(seg)) if seg else 0
        for seg in pattern.split(_PIPELINE_SEPARATOR)
    )


def to_hf_block_types(pattern: str) -> list[str]:
    """transformers' ``layers_block_type`` list for a canonical pattern."""
    return [SYMBOL_TO_HF_BLOCK_TYPE[c] for c in parse_hybrid_pattern(pattern)]
