"""An attention mixer over a prompt (keeping its keys and values) and then one token
at a time against that KV cache.

NemotronH attention has no positional encoding, so a cached key never changes and a
new token's query simply attends to every cached key (no mask: all are in its past).
"""

import torch
import torch.nn.functional as F

from .cache import KVCache


def _qkv(attn, x_BLD: torch.Tensor):
    Bsz, L, _ = x_BLD.shape
    P = attn.head_dim
    q_BHLP = attn.q_proj(x_BLD).view(Bsz, L, -1, P).transpose(1, 2)
    k_BHLP = attn.k_proj(x_BLD).view(Bsz, L, -1, P).transpose(1, 2)
    v_BHLP = attn.v_proj(x_BLD).view(Bsz, L, -1, P).transpose(1, 2)
    return q_BHLP, k_BHLP, v_BHLP


def _out(attn, out_BHLP: torch.Tensor) -> torch.Tensor:
    Bsz, _, L, _ = out_BHLP.shape
    return attn.o_proj(out_BHLP.transpose(1, 2).reshape(Bsz, L, -1))


def attention_prefill(
    attn, x_BLD: torch.Tensor, capacity: int = 0
) -> tuple[torch.Tensor, KVCache]:
    """Causal attention over the prompt, and its keys and values in a cache with room
    for ``capacity`` tokens (it grows past that if needed)."""
    q_BHLP, k_BHLP, v_BHLP = _qkv(attn, x_BLD)
    out_BHLP = F.scaled_dot_product_attention(
        q_BHLP, k_BHLP, v_BHLP, is_causal=True, enable_gqa=True
    )
    return _out(attn, out_BHLP), KVCache(k_BHLP, v_BHLP, capacity)


def attention_step(attn, x_B1D: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One more token: its key and value join the cache, its query reads all of it.
    (No ``is_causal``: SDPA aligns that mask top-left, which for one query row
    would hide every key but the first.) A merged batch's padding keys are masked."""
    q_BH1P, k_BH1P, v_BH1P = _qkv(attn, x_B1D)
    cache.append(k_BH1P, v_BH1P)
    out_BH1P = F.scaled_dot_product_attention(
        q_BH1P, cache.keys(), cache.values(), attn_mask=cache.mask(), enable_gqa=True
    )
    return _out(attn, out_BH1P)
