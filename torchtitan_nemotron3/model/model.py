"""NemotronH: a stack of single-mixer blocks chosen by the hybrid pattern."""

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from torchtitan.models.common.embedding import Embedding
from torchtitan.models.common.linear import Linear
from torchtitan.models.common.nn_modules import RMSNorm
from torchtitan.models.common.token_dispatcher import update_ep_token_dispatcher_config
from torchtitan.protocols.model import BaseModel
from torchtitan.protocols.module import Module, ModuleDict

from .attention import Attention
from .mamba2 import Mamba2Mixer
from .mlp import ReluSquaredMLP
from .moe import NemotronHMoE
from .pattern import ATTENTION, MAMBA, MOE


def seq_idx_from_positions(positions_BL: torch.Tensor) -> torch.Tensor:
    """Document index per token (int32, non-decreasing): a document starts wherever
    TorchTitan's dataloader restarts ``positions`` at 0 (and at every row start)."""
    starts_BL = positions_BL == 0
    starts_BL[:, 0] = True
    return (torch.cumsum(starts_BL, dim=-1, dtype=torch.int32) - 1).contiguous()


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
        self, h_BLD: torch.Tensor, seq_idx_BL: torch.Tensor | None = None
    ) -> torch.Tensor:
        x_BLD = self.norm(h_BLD)
        if self.needs_seq_idx:
            return h_BLD + self.mixer(x_BLD, seq_idx_BL)
        return h_BLD + self.mixer(x_BLD)


class NemotronHModel(BaseModel):
    """Embeddings → blocks → final RMSNorm → untied lm_head.

    ``forward(tokens, positions=None)``: with ``positions`` (packed rows from
    TorchTitan's dataloader), every layer keeps documents apart, so a packed row
    gives the logits each document would give alone.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseModel.Config):
        vocab_size: int
        dim: int
        tok_embeddings: Embedding.Config
        layers: list  # list[NemotronHBlock.Config], one per pattern symbol
        norm: RMSNorm.Config
        lm_head: Linear.Config
        # Layers per pipeline stage from a Megatron ``|`` pattern (``pipeline.py``).
        pipeline_segments: tuple[int, ...] | None = None

        @property
        def hybrid_override_pattern(self) -> str:
            return "".join(layer.layer_type for layer in self.layers)

        def update_from_config(self, *, config, **kwargs) -> None:
            """TorchTitan's hook before building: refuse layouts NemotronH cannot
            run, declare every module's sharding for the layout asked for, size the
            EP dispatchers, and pass the debug load-balance override to the routers."""
            # The layout code (``sharding.py``) sits above the model and registers
            # itself here, so the model imports nothing that imports it.
            if NemotronHModel.layout_hook is not None:
                NemotronHModel.layout_hook(self, config.parallelism)
            # TorchTitan's helper walks ``layers[i].moe``; ours hold ``mixer``.
            moe_view = SimpleNamespace(
                dim=self.dim,
                layers=[
                    SimpleNamespace(moe=layer.mixer)
                    for layer in self.layers
                    if layer.layer_type == MOE
                ],
            )
            update_ep_token_dispatcher_config(moe_view, config)
            debug = getattr(config, "debug", None)
            if debug is not None:
                for layer in self.layers:
                    if layer.layer_type == MOE:
                        router = layer.mixer.router
                        router._debug_force_load_balance = debug.moe_force_load_balance

        def get_nparams_and_flops(self, model, seq_len: int) -> tuple[int, int]:
            from .flops import nparams_and_flops

            return nparams_and_flops(self, model, seq_len)

    # ``sharding.apply_layout``: checks and declares the parallel layout (set on import).
    layout_hook = None
    # Set by the trainer when ChunkedLossWrapper applies lm_head inside the loss.
    _skip_lm_head: bool = False
    # TorchTitan's FSDP helper asks; NemotronH never ties.
    enable_weight_tying: bool = False

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.tok_embeddings = config.tok_embeddings.build()
        self.layers = ModuleDict(
            {str(i): layer.build() for i, layer in enumerate(config.layers)}
        )
        self.norm = config.norm.build()
        self.lm_head = config.lm_head.build()

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``tokens`` [B, L] ids; on a pipeline stage without ``tok_embeddings``
        (TorchTitan's split sets absent modules to None) the previous stage's
        hidden states [B, L, D]. Every stage gets ``positions`` and rebuilds the
        document layout from it, so packed documents stay apart on every stage."""
        seq_idx_BL = None if positions is None else seq_idx_from_positions(positions)
        if self.tok_embeddings is not None:
            h_BLD = self.tok_embeddings(tokens)
        else:
            h_BLD = tokens
        for layer in self.layers.values():
            h_BLD = layer(h_BLD, seq_idx_BL)
        if self.norm is not None:
            h_BLD = self.norm(h_BLD)
        if self.lm_head is None or self._skip_lm_head:
            return h_BLD
        return self.lm_head(h_BLD)
