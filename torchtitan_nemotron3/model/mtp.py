"""Multi-token prediction (MTP) as Megatron defines it for NemotronH (Super, Ultra).

For depth k = 1..D, with h_0 the main model's hidden state after its final norm:

* the input ids shifted left by k within each packed document (slots whose
  source lies past the document's end are invalid: filled with id 0, and their
  labels ignored);
* ``u = eh_proj(concat[enorm(embed(ids_k)), hnorm(h_{k-1})])`` — embedding first,
  the reverse of the DeepSeek-V3 paper;
* ``u`` through the block's layers (``mtp_hybrid_override_pattern``, Super "*E":
  ``u + attn(norm(u))`` then ``u + moe(norm(u))``), then ``final_layernorm`` → h_k;
  logits_k = the shared lm_head(h_k), predicting token t + 1 + k.

One stored block is applied D times (Megatron's ``mtp_use_repeated_layer``), so
its weights get the gradients of every depth; MTP gradients also reach the
backbone, the shared embedding and the head. The loss is
``L_main + λ/D · Σ_k CE_k``, each CE_k averaged over its own valid tokens.

The layout is the hub's (``mtp.layers.{i}``, no ``backbone.`` prefix): the first
layer also holds ``enorm`` / ``hnorm`` / ``eh_proj``, the last ``final_layernorm``,
so checkpoints map name for name.

Under pipeline parallelism the block runs on the last stage, which holds the
head but not the embedding: the first stage embeds the D shifted id tensors
(``input_embeddings``) and every stage passes them on beside the hidden state.
That costs D extra activations of the P2P traffic, and in exchange the embedding
stays one parameter on one stage: its gradient from the MTP lookups flows back
through the pipeline like any activation's, and no copy on the last stage has
to be kept equal (Megatron's shared-embedding all-reduce), counted once in the
gradient norm, or left out of checkpoints.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.models.common.linear import Linear
from torchtitan.models.common.nn_modules import RMSNorm
from torchtitan.protocols.module import Module, ModuleDict

from .block import NemotronHBlock


def shift_within_documents(
    x_BL: torch.Tensor, k: int, seq_idx_BL: torch.Tensor | None, fill: int
) -> torch.Tensor:
    """``x`` shifted left by ``k`` along the sequence; a slot whose source is past
    the row's end or in another document (``seq_idx`` differs) gets ``fill``."""
    L = x_BL.shape[1]
    out_BL = torch.full_like(x_BL, fill)
    if k >= L:
        return out_BL
    valid_BL = torch.ones_like(x_BL[:, k:], dtype=torch.bool)
    if seq_idx_BL is not None:
        valid_BL = seq_idx_BL[:, k:] == seq_idx_BL[:, : L - k]
    out_BL[:, : L - k] = torch.where(valid_BL, x_BL[:, k:], out_BL[:, : L - k])
    return out_BL


def input_embeddings(
    tokens_BL: torch.Tensor, num_depths: int, seq_idx_BL: torch.Tensor | None, embed
) -> list[torch.Tensor]:
    """What depth k = 1..D fuses with the hidden state: ``embed`` (the shared
    embedding) of the ids shifted left by k within each document (invalid slots
    get id 0; their labels are ignored)."""
    return [
        embed(shift_within_documents(tokens_BL, k, seq_idx_BL, fill=0))
        for k in range(1, num_depths + 1)
    ]


class MTPBlock(NemotronHBlock):
    """One sub-layer of the MTP block: a NemotronH block, plus the fusion
    (first sub-layer) or the final norm (last sub-layer) the hub stores with it."""

    @dataclass(kw_only=True, slots=True)
    class Config(NemotronHBlock.Config):
        enorm: RMSNorm.Config | None = None
        hnorm: RMSNorm.Config | None = None
        eh_proj: Linear.Config | None = None  # [H, 2H], no bias
        final_layernorm: RMSNorm.Config | None = None

    def __init__(self, config: Config):
        super().__init__(config)
        fusion = (config.enorm, config.hnorm, config.eh_proj)
        if any(c is None for c in fusion) and any(c is not None for c in fusion):
            raise ValueError("MTPBlock: enorm, hnorm and eh_proj come together")
        if config.eh_proj is not None:
            self.enorm = config.enorm.build()
            self.hnorm = config.hnorm.build()
            self.eh_proj = config.eh_proj.build()
        if config.final_layernorm is not None:
            self.final_layernorm = config.final_layernorm.build()

    def forward(
        self,
        h_BLD: torch.Tensor,
        seq_idx_BL: torch.Tensor | None = None,
        attention_masks=None,
        e_BLD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The fusion (first sub-layer: ``e_BLD``, the embedded shifted ids, with
        ``h_BLD``, the previous depth's hidden state), the block, and the final
        norm (last sub-layer), all inside this call: FSDP gathers, AC recomputes
        and compile traces every parameter of the sub-layer in its own forward."""
        if hasattr(self, "eh_proj"):
            if e_BLD is None:
                raise ValueError(
                    "the first MTP sub-layer needs e_BLD (the embedded ids)"
                )
            h_BLD = self.fuse(e_BLD, h_BLD)
        h_BLD = super().forward(h_BLD, seq_idx_BL, attention_masks)
        if hasattr(self, "final_layernorm"):
            h_BLD = self.final_layernorm(h_BLD)
        return h_BLD

    def fuse(self, e_BLD: torch.Tensor, h_BLD: torch.Tensor) -> torch.Tensor:
        return self.eh_proj(torch.cat([self.enorm(e_BLD), self.hnorm(h_BLD)], dim=-1))


class MultiTokenPrediction(Module):
    """The stored MTP block, applied ``num_depths`` times; returns h_1..h_D."""

    # ``parallelize.py`` runs TorchTitan's decoder helpers (AC, compile, FSDP) on
    # the block's ``layers``; the FSDP one asks for these, which the block lacks
    # (it borrows the main model's embedding and head).
    enable_weight_tying: bool = False
    tok_embeddings = norm = lm_head = None

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        num_depths: int  # D (mtp_num_layers)
        layers: list  # list[MTPBlock.Config]: first has the fusion, last the norm
        loss_scaling_factor: float = 0.3  # λ, for the trainer's mtp_loss

    def __init__(self, config: Config):
        super().__init__()
        if config.num_depths <= 0:
            raise ValueError(f"num_depths={config.num_depths}: must be positive")
        if not config.layers:
            raise ValueError("MultiTokenPrediction needs at least one layer")
        self.num_depths = config.num_depths
        self.loss_scaling_factor = config.loss_scaling_factor
        self.last_aux_loss: torch.Tensor | None = None
        self.layers = ModuleDict(
            {str(i): layer.build() for i, layer in enumerate(config.layers)}
        )
        first, last = self.layers["0"], self.layers[str(len(config.layers) - 1)]
        if not hasattr(first, "eh_proj") or not hasattr(last, "final_layernorm"):
            raise ValueError(
                "MultiTokenPrediction: the first layer needs enorm/hnorm/eh_proj and "
                "the last final_layernorm"
            )

    def forward(
        self,
        h_BLD: torch.Tensor,
        e_BLD_per_depth: list[torch.Tensor] | tuple[torch.Tensor, ...],
        seq_idx_BL: torch.Tensor | None,
        attention_masks=None,
    ) -> list[torch.Tensor]:
        """``h_BLD``: the main model's hidden state after its final norm;
        ``e_BLD_per_depth``: ``input_embeddings``' D tensors (under pipeline
        parallelism computed on the first stage and carried to the last);
        ``attention_masks``: the main forward's (same rows, same documents).
        Returns h_k (final-normed) per depth."""
        if len(e_BLD_per_depth) != self.num_depths:
            raise ValueError(
                f"MTP with {self.num_depths} depths got {len(e_BLD_per_depth)} "
                "embedded inputs"
            )
        layers = list(self.layers.values())
        out, aux_loss = [], None
        for e_BLD in e_BLD_per_depth:
            for i, layer in enumerate(layers):
                # the first sub-layer fuses e with h; the last final-norms its output
                h_BLD = layer(
                    h_BLD, seq_idx_BL, attention_masks, e_BLD if i == 0 else None
                )
                value = _fresh_aux_loss(layer)
                if value is not None:
                    aux_loss = value if aux_loss is None else aux_loss + value
            out.append(h_BLD)
        # The block's MoE runs D times; its layer keeps only the last depth's
        # sequence aux loss, this is the sum over depths (for logging).
        self.last_aux_loss = aux_loss
        return out


def _fresh_aux_loss(layer) -> torch.Tensor | None:
    """The sequence aux loss the layer's MoE just computed, if it did."""
    if not layer.moe_enabled:
        return None
    moe = layer.moe
    if not (moe.training and moe.seq_aux_loss_coeff > 0):
        return None
    return moe.last_aux_loss


def mtp_labels(
    labels_BL: torch.Tensor, k: int, seq_idx_BL: torch.Tensor | None
) -> torch.Tensor:
    """Depth k's targets: the main labels shifted left by k within each document
    (token t + 1 + k at slot t), ``IGNORE_INDEX`` where the shift leaves it."""
    return shift_within_documents(labels_BL, k, seq_idx_BL, fill=IGNORE_INDEX)


def mtp_loss(
    logits: list[torch.Tensor],
    labels_BL: torch.Tensor,
    seq_idx_BL: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_main + scale/D · Σ_k CE_k`` from ``[main logits, depth-1 logits, ...]``;
    every CE is a mean over its own valid (non-ignored) tokens. Also returns the
    terms, detached, for logging: ``{"main": L_main, "mtp_1": CE_1, ...}``."""
    if len(logits) < 2:
        raise ValueError(
            f"mtp_loss needs main logits and >= 1 MTP depth, got {len(logits)} tensors"
        )

    def ce(logits_BLV: torch.Tensor, target_BL: torch.Tensor) -> torch.Tensor:
        # A mean that stays 0 (not NaN) when no token is valid, e.g. documents
        # shorter than the depth.
        total = F.cross_entropy(
            logits_BLV.flatten(0, 1).float(),
            target_BL.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return total / (target_BL != IGNORE_INDEX).sum().clamp_min(1)

    main = ce(logits[0], labels_BL)
    terms = {"main": main.detach()}
    depth_losses = []
    for k, logits_BLV in enumerate(logits[1:], 1):
        loss_k = ce(logits_BLV, mtp_labels(labels_BL, k, seq_idx_BL))
        terms[f"mtp_{k}"] = loss_k.detach()
        depth_losses.append(loss_k)
    D = len(depth_losses)
    return main + (scale / D) * torch.stack(depth_losses).sum(), terms
