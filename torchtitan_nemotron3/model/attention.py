"""NemotronH's attention (``*`` layers): causal GQA with no positional encoding."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from torchtitan.models.common.linear import Linear
from torchtitan.protocols.module import Module


def document_causal_mask(seq_idx_BL: torch.Tensor) -> torch.Tensor:
    """``mask[b, 0, i, j]``: j <= i and both in the same document (True = attend)."""
    L = seq_idx_BL.size(1)
    causal_LL = torch.ones(L, L, dtype=torch.bool, device=seq_idx_BL.device).tril()
    same_doc_BLL = seq_idx_BL[:, :, None] == seq_idx_BL[:, None, :]
    return (same_doc_BLL & causal_LL)[:, None]


class DocumentCausalSDPA(Module):
    """SDPA over ``(batch, seq, heads, head_dim)`` with the causal (and document)
    mask. A module of its own so tensor parallelism can run it under ``local_map``
    on this rank's heads (TorchTitan's inner-attention pattern); the document
    index is keyword-only: a plain, replicated full-length tensor, or None."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        pass

    def __init__(self, config: Config):
        super().__init__()

    def forward(
        self,
        q_BLHP: torch.Tensor,
        k_BLHP: torch.Tensor,
        v_BLHP: torch.Tensor,
        *,
        seq_idx_BL: torch.Tensor | None = None,
    ) -> torch.Tensor:
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


class Attention(Module):
    """Grouped-query attention through SDPA. There is no RoPE: the Mamba2 layers
    carry order, so attention sees only content (and the causal/document mask)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        n_heads: int
        n_kv_heads: int
        head_dim: int
        q_proj: Linear.Config
        k_proj: Linear.Config
        v_proj: Linear.Config
        o_proj: Linear.Config
        inner_attention: DocumentCausalSDPA.Config = field(
            default_factory=DocumentCausalSDPA.Config
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

    def forward(
        self, x_BLD: torch.Tensor, seq_idx_BL: torch.Tensor | None = None
    ) -> torch.Tensor:
        Bsz, L, _ = x_BLD.shape
        # -1: all heads, or this rank's under TP (heads sharded, Shard(2)).
        q_BLHP = self.q_proj(x_BLD).view(Bsz, L, -1, self.head_dim)
        k_BLHP = self.k_proj(x_BLD).view(Bsz, L, -1, self.head_dim)
        v_BLHP = self.v_proj(x_BLD).view(Bsz, L, -1, self.head_dim)
        out_BLHP = self.inner_attention(q_BLHP, k_BLHP, v_BLHP, seq_idx_BL=seq_idx_BL)
        return self.o_proj(out_BLHP.reshape(Bsz, L, -1))
