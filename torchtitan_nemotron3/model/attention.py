"""NemotronH's attention (``*`` layers): causal GQA with no positional encoding."""

from dataclasses import dataclass

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

    def __init__(self, config: Config):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = config.q_proj.build()
        self.k_proj = config.k_proj.build()
        self.v_proj = config.v_proj.build()
        self.o_proj = config.o_proj.build()

    def forward(
        self, x_BLD: torch.Tensor, seq_idx_BL: torch.Tensor | None = None
    ) -> torch.Tensor:
        Bsz, L, _ = x_BLD.shape
        q_BHLP = self.q_proj(x_BLD).view(Bsz, L, -1, self.head_dim).transpose(1, 2)
        k_BHLP = self.k_proj(x_BLD).view(Bsz, L, -1, self.head_dim).transpose(1, 2)
        v_BHLP = self.v_proj(x_BLD).view(Bsz, L, -1, self.head_dim).transpose(1, 2)
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
        return self.o_proj(out_BHLP.transpose(1, 2).reshape(Bsz, L, -1))
