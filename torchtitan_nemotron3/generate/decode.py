"""Incremental decoding of a ``NemotronHModel``: ``prefill`` the prompt once, then
``step`` one token at a time.

The blocks are walked as ``NemotronHModel.forward`` walks them (``h + mixer(norm(h))``,
final norm, ``lm_head``); only the sequence mixers are replaced, by their cached
forms (``mamba_decode``, ``attention_decode``). MLP and MoE layers run their own
modules on the one new token (same router, same experts). The prompt is one
document (no ``positions``), as in ``model(tokens)``.
"""

import torch

from ..model.pattern import ATTENTION, MAMBA
from .attention_decode import attention_prefill, attention_step
from .cache import DecodeCache
from .mamba_decode import mamba_prefill, mamba_step
from .mamba_parts import mamba_parts


def _logits(model, h_BLD: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.norm(h_BLD))


@torch.no_grad()
def prefill(
    model, tokens_BL: torch.Tensor, capacity: int = 0, all_logits: bool = False
) -> tuple[DecodeCache, torch.Tensor]:
    """Run the prompt through the model once. Returns the cache after its last token
    and the logits ``(B, V)`` of that token (``(B, L, V)`` with ``all_logits``).
    ``capacity``: tokens the KV caches reserve room for (prompt plus new ones)."""
    cache = DecodeCache(length=tokens_BL.size(1))
    h_BLD = model.tok_embeddings(tokens_BL)
    for name, block in model.layers.items():
        x_BLD = block.norm(h_BLD)
        if block.layer_type == MAMBA:
            parts = cache.parts[name] = mamba_parts(block.mixer)
            out_BLD, cache.layers[name] = mamba_prefill(parts, x_BLD)
        elif block.layer_type == ATTENTION:
            out_BLD, cache.layers[name] = attention_prefill(
                block.mixer, x_BLD, capacity
            )
        else:
            out_BLD, cache.layers[name] = block.mixer(x_BLD), None
        h_BLD = h_BLD + out_BLD
    if not all_logits:
        h_BLD = h_BLD[:, -1:]
    logits_BLV = _logits(model, h_BLD)
    return cache, logits_BLV if all_logits else logits_BLV[:, 0]


@torch.no_grad()
def step(model, cache: DecodeCache, token_B: torch.Tensor) -> torch.Tensor:
    """Feed one token per row (``(B,)``); returns its logits ``(B, V)`` and advances
    ``cache`` in place. The Mamba layers cost O(1) in the length so far; attention
    reads its KV cache."""
    h_B1D = model.tok_embeddings(token_B[:, None])
    for name, block in model.layers.items():
        x_B1D = block.norm(h_B1D)
        if block.layer_type == MAMBA:
            out_B1D = mamba_step(cache.parts[name], x_B1D, cache.layers[name])
        elif block.layer_type == ATTENTION:
            out_B1D = attention_step(block.mixer, x_B1D, cache.layers[name])
        else:
            out_B1D = block.mixer(x_B1D)
        h_B1D = h_B1D + out_B1D
    cache.length += 1
    return _logits(model, h_B1D)[:, 0]
