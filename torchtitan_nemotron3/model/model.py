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

from .attention import AttentionMasks, attention_masks_for
from .context_parallel import CPLayout, global_seq_idx
from .moe import NemotronHMoE
from .pattern import ATTENTION, MAMBA, MOE


def seq_idx_from_positions(positions_BL: torch.Tensor) -> torch.Tensor:
    """Document index per token (int32, non-decreasing): a document starts wherever
    TorchTitan's dataloader restarts ``positions`` at 0 (and at every row start)."""
    starts_BL = positions_BL == 0
    starts_BL[:, 0] = True
    return (torch.cumsum(starts_BL, dim=-1, dtype=torch.int32) - 1).contiguous()


def _check_mtp_layout(parallelism) -> None:
    """MTP runs with FSDP/HSDP, EP and TP (``sharding.py`` lays its block out as
    the main blocks); pipeline and context parallelism are refused by name: the
    block needs the input ids and the shared embedding on the last stage, and
    its shifts cross CP shard boundaries."""
    degrees = {
        name: getattr(parallelism, name, 1)
        for name in ("pipeline_parallel_degree", "context_parallel_degree")
    }
    wrong = [f"parallelism.{name}={d}" for name, d in degrees.items() if d > 1]
    if wrong:
        raise NotImplementedError(
            f"{', '.join(wrong)}: multi-token prediction is not wired for this "
            "layout yet; train with mtp_num_layers=0, or with FSDP, EP and TP only"
        )


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
        # Multi-token prediction (``mtp.py``), None when off.
        mtp: Module.Config | None = None

        @property
        def hybrid_override_pattern(self) -> str:
            return "".join(layer.layer_type for layer in self.layers)

        def update_from_config(self, *, config, **kwargs) -> None:
            """TorchTitan's hook before building: refuse layouts NemotronH cannot
            run, declare every module's sharding for the layout asked for, size the
            EP dispatchers, and pass the debug load-balance override to the routers."""
            if self.mtp is not None:
                _check_mtp_layout(config.parallelism)
            # The layout code (``sharding.py``) sits above the model and registers
            # itself here, so the model imports nothing that imports it.
            if NemotronHModel.layout_hook is not None:
                NemotronHModel.layout_hook(
                    self, config.parallelism, seq_len=config.training.seq_len
                )
            # TorchTitan's helper walks ``layers[i].moe``; ours hold ``mixer``.
            # The MTP block's MoE layers are dispatched like the main ones.
            blocks = list(self.layers) + (self.mtp.layers if self.mtp else [])
            moe_view = SimpleNamespace(
                dim=self.dim,
                layers=[
                    SimpleNamespace(moe=layer.mixer)
                    for layer in blocks
                    if layer.layer_type == MOE
                ],
            )
            update_ep_token_dispatcher_config(moe_view, config)
            debug = getattr(config, "debug", None)
            if debug is not None:
                for layer in blocks:
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
        self.mtp = None if config.mtp is None else config.mtp.build()

    # This rank's share of each row under context parallelism (``parallelize.py``
    # sets it; the mixers get it through ``context_parallel.set_context_parallel``).
    cp_layout: CPLayout | None = None

    def _document_index(self, positions_BL: torch.Tensor | None) -> torch.Tensor | None:
        """Document index per token; under CP counted over the whole row, not the
        shard, so a document crossing a shard boundary keeps one index."""
        if positions_BL is None:
            return None
        if self.cp_layout is not None:
            return global_seq_idx(positions_BL, self.cp_layout)
        return seq_idx_from_positions(positions_BL)

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        """``tokens`` [B, L] ids; on a pipeline stage without ``tok_embeddings``
        (TorchTitan's split sets absent modules to None) the previous stage's
        hidden states [B, L, D]. Every stage gets ``positions`` and rebuilds the
        document layout from it, so packed documents stay apart on every stage.

        With MTP (``mtp.py``): ``[main logits, depth-1 logits, ...]``."""
        seq_idx_BL = self._document_index(positions)
        if self.tok_embeddings is not None:
            h_BLD = self.tok_embeddings(tokens)
        else:
            h_BLD = tokens
        # Built once here, shared by every attention layer (None for SDPA).
        attention_masks = attention_masks_for(
            self.layers, seq_idx_BL, h_BLD.size(0), h_BLD.size(1), h_BLD.device
        )
        for layer in self.layers.values():
            h_BLD = layer(h_BLD, seq_idx_BL, attention_masks)
        if self.norm is not None:
            h_BLD = self.norm(h_BLD)
        if self.mtp is not None:
            if self.tok_embeddings is None:
                raise NotImplementedError(
                    "MTP needs the input ids and the shared embedding on the stage "
                    "that runs it; pipeline parallelism with MTP is not wired yet"
                )
            hidden = [
                h_BLD,
                *self.mtp(
                    h_BLD, tokens, seq_idx_BL, self.tok_embeddings, attention_masks
                ),
            ]
            if self.lm_head is None or self._skip_lm_head:
                return hidden
            return [self.lm_head(h) for h in hidden]
        if self.lm_head is None or self._skip_lm_head:
            return h_BLD
        return self.lm_head(h_BLD)
