"""Attention's document layout without an ``L x L`` tensor, and attention under
context parallelism (CP).

GPU path (``attention.DocumentCausalAttention``, backends "flex" and "varlen"):
the document-causal ``BlockMask`` for TorchTitan's ``FlexAttention`` and the
``cu_seqlens`` for its ``VarlenAttention``, built once per forward from the
document ids ``seq_idx`` (``model.seq_idx_from_positions``: every row's first
token starts a document) with TorchTitan's own helpers and mask mods.

Under CP every rank holds its queries' segments (``context_parallel.CPLayout``)
and needs every earlier key of the row: K and V are all-gathered along the
sequence (cheap for NemotronH: 2 KV heads, against 32 query heads; the gradient
is reduce-scattered back). Two ways to attend over them, both exact:

- ``document_causal_attention_cp`` (any device, CPU/gloo included; the "sdpa"
  backend): one masked SDPA with a ``(B, L/cp, L)`` boolean mask from global token
  indices and global document ids; the gathered keys stay rank-major, the mask
  compares global indices, so TorchTitan's head-tail order needs no undoing.
- the "flex" backend: K/V put back in row order (``gather_kv_in_row_order``) and
  a block mask over the whole row's keys whose query rows are this rank's
  segments (``document_causal_block_mask(..., layout=...)``: the row's mask mod
  read at each local query's global index), from the global document ids.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import (
    BlockMask,
    _mask_mod_signature,
    and_masks,
    create_block_mask,
)
from torchtitan.models.common.attention import (
    VarlenMetadata,
    create_attention_mask,
    create_varlen_metadata_for_document,
    get_causal_mask_mod,
    get_efficient_causal_mask_mod_for_packed_document,
)

from .context_parallel import CPLayout, all_gather, all_gather_no_grad


def _starts_as_positions(seq_idx_BL: torch.Tensor) -> torch.Tensor:
    """0 where a document starts (each row's first token included), 1 elsewhere:
    the ``positions`` convention TorchTitan's document helpers read."""
    starts_BL = torch.ones_like(seq_idx_BL, dtype=torch.bool)
    starts_BL[:, 1:] = seq_idx_BL[:, 1:] != seq_idx_BL[:, :-1]
    return (~starts_BL).to(torch.int32)


def document_varlen_metadata(seq_idx_BL: torch.Tensor) -> VarlenMetadata:
    """``cu_seqlens`` over the flattened batch, one segment per document (no CP:
    TorchTitan's ``VarlenAttention`` has no context-parallel path)."""
    return create_varlen_metadata_for_document(_starts_as_positions(seq_idx_BL))


def document_causal_mask_mod(seq_idx_BK: torch.Tensor | None) -> _mask_mod_signature:
    """Causal and same-document mask mod over whole ``(B, K)`` rows (TorchTitan's
    decoder mask: ``get_causal_mask_mod`` and its packed-document bound); None:
    causal only."""
    if seq_idx_BK is None:
        return get_causal_mask_mod()
    return and_masks(
        get_causal_mask_mod(),
        get_efficient_causal_mask_mod_for_packed_document(
            _starts_as_positions(seq_idx_BK)
        ),
    )


def to_row_order(x_WBL: torch.Tensor, layout: CPLayout) -> torch.Tensor:
    """``(W, B, L/cp, ...)`` gathered rank-major → ``(B, L, ...)`` in row order,
    each global segment taken from the rank holding it (head-tail undone)."""
    S = x_WBL.size(2) // layout.n_segments
    pieces = []
    for g in range(layout.size * layout.n_segments):
        rank, s = layout.owner(g)
        pieces.append(x_WBL[rank, :, s * S : (s + 1) * S])
    return torch.cat(pieces, dim=1)


def gather_kv_in_row_order(
    k_BLHP: torch.Tensor, v_BLHP: torch.Tensor, layout: CPLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole row's K and V, in row order, from every rank's shard (one
    all-gather for both; its backward reduce-scatters the gradients)."""
    kv_W2BLHP = all_gather(torch.stack([k_BLHP, v_BLHP]), layout)
    return to_row_order(kv_W2BLHP[:, 0], layout), to_row_order(kv_W2BLHP[:, 1], layout)


def document_causal_block_mask(
    seq_idx_BL: torch.Tensor | None,
    Bsz: int,
    L: int,
    device: torch.device,
    *,
    layout: CPLayout | None = None,
    block_size: int | tuple[int, int] = 128,
    create_fn: Callable[..., BlockMask] = create_attention_mask,
) -> BlockMask:
    """FlexAttention block mask for ``(B, L)`` rows of documents ``seq_idx``
    (None: one document per row).

    Under CP (``layout``): ``L`` and ``seq_idx`` are this rank's (global ids);
    the mask's keys are the whole row in row order (``gather_kv_in_row_order``)
    and its ``L`` query rows this rank's segments.

    ``create_fn``: TorchTitan's compiled ``create_block_mask`` (the mask mod is
    evaluated block by block, no ``L x L`` tensor); on CPU the eager one."""
    if layout is None:
        mask_mod, kv_len = document_causal_mask_mod(seq_idx_BL), L
    else:
        ids_BK = None
        if seq_idx_BL is not None:
            ids_BK = to_row_order(all_gather_no_grad(seq_idx_BL, layout), layout)
        row_mod = document_causal_mask_mod(ids_BK)
        q_index_L = layout.global_index(L, device)
        kv_len = L * layout.size

        def mask_mod(b, h, q_idx, kv_idx):
            return row_mod(b, h, q_index_L[q_idx], kv_idx)

    return create_fn(
        mask_mod, Bsz, None, L, kv_len, device=device, BLOCK_SIZE=block_size
    )


def create_block_mask_for(device: torch.device) -> Callable[..., BlockMask]:
    """TorchTitan's compiled ``create_block_mask`` on CUDA; the eager one
    elsewhere (CPU tests: no compile, small rows)."""
    return create_attention_mask if device.type == "cuda" else create_block_mask


def document_causal_attention_cp(
    q_BLHP: torch.Tensor,
    k_BLHP: torch.Tensor,
    v_BLHP: torch.Tensor,
    seq_idx_BL: torch.Tensor | None,
    layout: CPLayout,
) -> torch.Tensor:
    """Causal GQA of this rank's queries over the whole row's keys, documents
    kept apart; ``seq_idx``: global document ids of this rank's tokens (None: one
    document per row)."""
    L = q_BLHP.size(1)
    W = layout.size
    # K and V in one collective (one backward reduce-scatter, one order on every rank).
    kv_W2BLHP = all_gather(torch.stack([k_BLHP, v_BLHP]), layout)
    k_BKHP, v_BKHP = (t.transpose(0, 1).flatten(1, 2) for t in kv_W2BLHP.unbind(1))
    pos_q_L = layout.global_index(L, q_BLHP.device)
    pos_k_K = torch.cat([layout.global_index(L, q_BLHP.device, w) for w in range(W)])
    mask_BLK = (pos_k_K[None, :] <= pos_q_L[:, None])[None]
    if seq_idx_BL is not None:
        ids_k_BK = all_gather_no_grad(seq_idx_BL, layout).transpose(0, 1).flatten(1)
        mask_BLK = mask_BLK & (seq_idx_BL[:, :, None] == ids_k_BK[:, None, :])
    out_BHLP = F.scaled_dot_product_attention(
        q_BLHP.transpose(1, 2),
        k_BKHP.transpose(1, 2),
        v_BKHP.transpose(1, 2),
        attn_mask=mask_BLK[:, None],
        enable_gqa=True,
    )
    return out_BHLP.transpose(1, 2)
