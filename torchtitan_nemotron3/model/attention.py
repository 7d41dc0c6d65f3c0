"""NemotronH's attention (``*`` layers): causal GQA with no positional encoding,
documents of a packed row kept apart, on the backend the model config names."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torchtitan.models.common.attention import (
    FlexAttention,
    VarlenAttention,
    VarlenMetadata,
)
from torchtitan.models.common.linear import Linear
from torchtitan.protocols.module import Module

from .attention_cp import (
    create_block_mask_for,
    document_causal_attention_cp,
    document_causal_block_mask,
    document_varlen_metadata,
    gather_kv_in_row_order,
)
from .context_parallel import CPLayout

ATTENTION_BACKENDS = ("sdpa", "flex", "varlen", "auto")

AttentionMasks = BlockMask | VarlenMetadata


def check_attention_backend(backend: str, *, cp: int = 1) -> None:
    """One-line ``ValueError`` for a backend name not in ``ATTENTION_BACKENDS``, or
    "varlen" under context parallelism (TorchTitan's varlen has no CP path)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {backend!r}; choose from {list(ATTENTION_BACKENDS)}"
        )
    if backend == "varlen" and cp > 1:
        raise ValueError(
            f"attention backend 'varlen' has no context-parallel path "
            f"(context_parallel_degree={cp}); use 'flex' or 'auto'"
        )


def document_causal_mask(seq_idx_BL: torch.Tensor) -> torch.Tensor:
    """``mask[b, 0, i, j]``: j <= i and both in the same document (True = attend)."""
    L = seq_idx_BL.size(1)
    causal_LL = torch.ones(L, L, dtype=torch.bool, device=seq_idx_BL.device).tril()
    same_doc_BLL = seq_idx_BL[:, :, None] == seq_idx_BL[:, None, :]
    return (same_doc_BLL & causal_LL)[:, None]


class DocumentCausalAttention(Module):
    """Inner attention over ``(batch, seq, heads, head_dim)``: causal, and within
    documents when ``seq_idx`` is given. A module of its own so tensor parallelism
    runs it under ``local_map`` on this rank's heads (TorchTitan's inner-attention
    pattern); ``seq_idx`` and ``attention_masks`` are keyword-only and plain.

    Backends (``Config.backend``):

    - "sdpa": exact SDPA with a dense ``(B, 1, L, L)`` mask; the CPU path and the
      reference.
    - "flex": TorchTitan's ``FlexAttention`` (compiled) with a document-causal
      ``BlockMask``; on CPU tensors eager ``flex_attention`` (forward only: torch
      has no CPU backward for it), which checks the mask.
    - "varlen": TorchTitan's ``VarlenAttention`` (flash varlen, CUDA, computes in
      bf16) over one ``cu_seqlens`` segment per document; no CP.
    - "auto": "flex" on CUDA tensors, "sdpa" elsewhere.

    Rows without documents (``seq_idx`` None) outside CP take SDPA's causal
    kernel on every backend (flash on CUDA, no mask at all). The block mask or
    ``cu_seqlens`` (``document_masks``) is built once per forward by the model and
    reaches every layer as ``attention_masks``; a call without it (the MTP block,
    a lone layer) builds its own.

    Under context parallelism (``cp_layout``, set by ``Attention.set_context_parallel``)
    ``seq_idx`` is this rank's shard of the global document ids: "sdpa" attends
    through ``attention_cp.document_causal_attention_cp``, "flex" over the
    all-gathered K/V in row order with this rank's query rows of the block mask.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        backend: str = "sdpa"
        flex: FlexAttention.Config = field(default_factory=FlexAttention.Config)
        varlen: VarlenAttention.Config = field(default_factory=VarlenAttention.Config)

        def __post_init__(self):
            check_attention_backend(self.backend)

    def __init__(self, config: Config):
        super().__init__()
        self.backend = config.backend
        self.block_size = config.flex.block_size
        self.cp_layout: CPLayout | None = None
        # TorchTitan's modules run the GPU kernels (no parameters).
        self.flex = config.flex.build() if self.backend in ("flex", "auto") else None
        self.varlen = config.varlen.build() if self.backend == "varlen" else None

    def backend_for(self, device: torch.device) -> str:
        """The backend that runs on ``device`` ("auto" resolved)."""
        if self.backend == "auto":
            return "flex" if device.type == "cuda" else "sdpa"
        return self.backend

    def _needs_masks(self, backend: str, seq_idx_BL: torch.Tensor | None) -> bool:
        return backend != "sdpa" and (
            seq_idx_BL is not None or self.cp_layout is not None
        )

    def document_masks(
        self, seq_idx_BL: torch.Tensor | None, Bsz: int, L: int, device: torch.device
    ) -> AttentionMasks | None:
        """What this backend needs for ``(Bsz, L)`` rows of documents ``seq_idx``
        (this rank's ``L`` under CP): a ``BlockMask`` (flex), ``VarlenMetadata``
        (varlen), or None (sdpa, and rows without documents outside CP)."""
        backend = self.backend_for(device)
        if not self._needs_masks(backend, seq_idx_BL):
            return None
        if backend == "varlen":
            return document_varlen_metadata(seq_idx_BL)
        return document_causal_block_mask(
            seq_idx_BL,
            Bsz,
            L,
            device,
            layout=self.cp_layout,
            block_size=self.block_size,
            create_fn=create_block_mask_for(device),
        )

    def forward(
        self,
        q_BLHP: torch.Tensor,
        k_BLHP: torch.Tensor,
        v_BLHP: torch.Tensor,
        *,
        seq_idx_BL: torch.Tensor | None = None,
        attention_masks: AttentionMasks | None = None,
    ) -> torch.Tensor:
        backend = self.backend_for(q_BLHP.device)
        if not self._needs_masks(backend, seq_idx_BL):
            return self._sdpa(q_BLHP, k_BLHP, v_BLHP, seq_idx_BL)
        if attention_masks is None:
            Bsz, L = q_BLHP.shape[:2]
            attention_masks = self.document_masks(seq_idx_BL, Bsz, L, q_BLHP.device)
        if backend == "varlen":
            return self.varlen(
                q_BLHP, k_BLHP, v_BLHP, attention_masks=attention_masks, enable_gqa=True
            )
        if self.cp_layout is not None:
            k_BLHP, v_BLHP = gather_kv_in_row_order(k_BLHP, v_BLHP, self.cp_layout)
        if q_BLHP.is_cuda:
            return self.flex(
                q_BLHP, k_BLHP, v_BLHP, attention_masks=attention_masks, enable_gqa=True
            )
        out_BHLP = flex_attention(
            *(t.transpose(1, 2) for t in (q_BLHP, k_BLHP, v_BLHP)),
            block_mask=attention_masks,
            enable_gqa=True,
        )
        return out_BHLP.transpose(1, 2)

    def _sdpa(self, q_BLHP, k_BLHP, v_BLHP, seq_idx_BL) -> torch.Tensor:
        """The exact masked SDPA (the dense mask only when there are documents)."""
        if self.cp_layout is not None:
            return document_causal_attention_cp(
                q_BLHP, k_BLHP, v_BLHP, seq_idx_BL, self.cp_layout
            )
        q_BHLP, k_BHLP, v_BHLP = (t.transpose(1, 2) for t in (q_BLHP, k_BLHP, v_BLHP))
        if seq_idx_BL is None:
            out_BHLP = F.scaled_dot_product_attention(
                q_BHLP, k_BHLP, v_BHLP, is_causal=True, enable_gqa=True
            )
        else:
            out_BHLP = F.scaled_dot_product_attention(
                q_BHLP,
                k_BHLP,
                v_BHLP,
                attn_mask=document_causal_mask(seq_idx_BL),
                enable_gqa=True,
            )
        return out_BHLP.transpose(1, 2)


def attention_masks_for(
    layers: torch.nn.Module,
    seq_idx_BL: torch.Tensor | None,
    Bsz: int,
    L: int,
    device: torch.device,
) -> AttentionMasks | None:
    """The block mask / ``cu_seqlens`` every attention layer in ``layers`` shares,
    built once per forward by the first one's backend (None: no attention layer
    here, e.g. a pipeline stage of Mamba and MoE only, or none needed)."""
    for m in layers.modules():
        if isinstance(m, DocumentCausalAttention):
            return m.document_masks(seq_idx_BL, Bsz, L, device)
    return None


class Attention(Module):
    """Grouped-query attention (inner module: ``DocumentCausalAttention``). There
    is no RoPE: the Mamba2 layers carry order, so attention sees only content (and
    the causal/document mask)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        n_heads: int
        n_kv_heads: int
        head_dim: int
        q_proj: Linear.Config
        k_proj: Linear.Config
        v_proj: Linear.Config
        o_proj: Linear.Config
        inner_attention: DocumentCausalAttention.Config = field(
            default_factory=DocumentCausalAttention.Config
        )

    def __init__(self, config: Config):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = config.q_proj.build()
        self.k_proj = config.k_proj.build()
        self.v_proj = config.v_proj.build()
        self.o_proj = config.o_proj.build()
        self.inner_attention = config.inner_attention.build()

    def set_context_parallel(self, layout: CPLayout | None) -> None:
        """Attend over the CP shard ``layout`` describes (None: the whole row)."""
        if layout is not None:
            check_attention_backend(self.inner_attention.backend, cp=layout.size)
        self.inner_attention.cp_layout = layout

    def forward(
        self,
        x_BLD: torch.Tensor,
        seq_idx_BL: torch.Tensor | None = None,
        attention_masks: AttentionMasks | None = None,
    ) -> torch.Tensor:
        Bsz, L, _ = x_BLD.shape
        # -1: all heads, or this rank's under TP (heads sharded, Shard(2)).
        q_BLHP = self.q_proj(x_BLD).view(Bsz, L, -1, self.head_dim)
        k_BLHP = self.k_proj(x_BLD).view(Bsz, L, -1, self.head_dim)
        v_BLHP = self.v_proj(x_BLD).view(Bsz, L, -1, self.head_dim)
        out_BLHP = self.inner_attention(
            q_BLHP,
            k_BLHP,
            v_BLHP,
            seq_idx_BL=seq_idx_BL,
            attention_masks=attention_masks,
        )
        return self.o_proj(out_BLHP.reshape(Bsz, L, -1))
