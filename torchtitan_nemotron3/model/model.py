"""NemotronH: a stack of single-mixer blocks (``block.py``) chosen by the hybrid
pattern, then the final norm, the head and, for Super/Ultra, the MTP block."""

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from torchtitan.models.common.embedding import Embedding
from torchtitan.models.common.linear import Linear
from torchtitan.models.common.nn_modules import RMSNorm
from torchtitan.models.common.token_dispatcher import update_ep_token_dispatcher_config
from torchtitan.protocols.model import BaseModel
from torchtitan.protocols.module import Module, ModuleDict

from .attention import attention_masks_for
from .context_parallel import CPLayout, global_seq_idx
from .mtp import input_embeddings
from .pattern import MOE


def seq_idx_from_positions(positions_BL: torch.Tensor) -> torch.Tensor:
    """Document index per token (int32, non-decreasing): a document starts wherever
    TorchTitan's dataloader restarts ``positions`` at 0 (and at every row start)."""
    starts_BL = positions_BL == 0
    starts_BL[:, 0] = True
    return (torch.cumsum(starts_BL, dim=-1, dtype=torch.int32) - 1).contiguous()


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
        # LoRA's frozen base storage (``qlora/``): None keeps it in the compute
        # dtype; "nf4" quantizes the frozen linears and routed experts after load
        # (lm_head too with ``nf4_lm_head``).
        base_dtype: str | None = None
        nf4_lm_head: bool = False

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
        self,
        tokens: torch.Tensor,
        *mtp_inputs: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]:
        """``tokens`` [B, L] ids; on a pipeline stage without ``tok_embeddings``
        (TorchTitan's split sets absent modules to None) the previous stage's
        hidden states [B, L, D]. Every stage gets ``positions`` and rebuilds the
        document layout from it, so packed documents stay apart on every stage.

        With MTP (``mtp.py``): ``[main logits, depth-1 logits, ...]``. Under
        pipeline parallelism a stage before the one holding the MTP block returns
        ``(hidden, e_1, ..., e_D)``: the first stage embeds the MTP block's
        shifted ids, and later stages get them as ``mtp_inputs`` and pass them on."""
        if mtp_inputs and (self.config.mtp is None or self.tok_embeddings is not None):
            raise TypeError(
                "NemotronHModel.forward(tokens, positions=...): positions is keyword-"
                "only; extra positional inputs are the MTP embeddings that a pipeline "
                "stage passes on"
            )
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
        if self.config.mtp is not None:
            if not mtp_inputs:
                if self.tok_embeddings is None:
                    raise ValueError(
                        "MTP needs the shifted ids' embeddings: this pipeline stage "
                        "has no tok_embeddings and was passed none"
                    )
                mtp_inputs = input_embeddings(
                    tokens, self.config.mtp.num_depths, seq_idx_BL, self.tok_embeddings
                )
            if self.mtp is None:  # an earlier pipeline stage: pass them on
                return (h_BLD, *mtp_inputs)
            hidden = [h_BLD, *self.mtp(h_BLD, mtp_inputs, seq_idx_BL, attention_masks)]
            if self.lm_head is None or self._skip_lm_head:
                return hidden
            return [self.lm_head(h) for h in hidden]
        if self.lm_head is None or self._skip_lm_head:
            return h_BLD
        return self.lm_head(h_BLD)
