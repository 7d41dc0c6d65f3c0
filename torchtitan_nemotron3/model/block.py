"""One NemotronH layer: ``h + mixer(norm(h))``, the mixer chosen by its pattern
symbol. The main stack and the MTP block (``mtp.py``) are made of these."""

from dataclasses import dataclass

import torch
from torchtitan.models.common.nn_modules import RMSNorm
from torchtitan.protocols.module import Module

from .attention import AttentionMasks
from .moe import NemotronHMoE
from .pattern import ATTENTION, MAMBA, MOE


class NemotronHBlock(Module):
    """``h + mixer(norm(h))``; the mixer is one of Mamba2, attention, MLP or MoE."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        layer_type: str  # one pattern symbol: M * - E
        norm: RMSNorm.Config
        mixer: Module.Config

    def __init__(self, config: Config):
        super().__init__()
        self.layer_type = config.layer_type
        self.norm = config.norm.build()
        self.mixer = config.mixer.build()
        # Sequence mixers need the document layout; the channel mixers are per token.
        self.needs_seq_idx = config.layer_type in (MAMBA, ATTENTION)
        # TorchTitan's FSDP helper and load-balancing hook look for ``moe_enabled``
        # and ``block.moe``.
        self.moe_enabled = config.layer_type == MOE

    @property
    def moe(self) -> NemotronHMoE:
        if not self.moe_enabled:
            raise AttributeError(f"{self.layer_type!r} block has no MoE")
        return self.mixer

    def forward(
        self,
        h_BLD: torch.Tensor,
        seq_idx_BL: torch.Tensor | None = None,
        attention_masks: AttentionMasks | None = None,
    ) -> torch.Tensor:
        """``attention_masks``: the forward's shared block mask / ``cu_seqlens``
        for an attention mixer (``attention.attention_masks_for``)."""
        x_BLD = self.norm(h_BLD)
        if self.layer_type == ATTENTION:
            return h_BLD + self.mixer(x_BLD, seq_idx_BL, attention_masks)
        if self.needs_seq_idx:
            return h_BLD + self.mixer(x_BLD, seq_idx_BL)
        return h_BLD + self.mixer(x_BLD)
