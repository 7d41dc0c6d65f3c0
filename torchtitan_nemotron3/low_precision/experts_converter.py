"""The converter that puts NemotronH's routed experts in FP8 rowwise or MXFP8."""

from dataclasses import dataclass, field, replace
from typing import Literal

from torchtitan.components.quantization import QuantizationConverter
from torchtitan.components.quantization.utils import swap_token_dispatcher
from torchtitan.models.common.token_dispatcher import (
    AllToAllTokenDispatcher,
    DeepEPTokenDispatcher,
    HybridEPTokenDispatcher,
    TorchAOTokenDispatcher,
)
from torchtitan.tools.logging import logger

from ..model.moe import ReluSquaredGroupedExperts
from .dispatch import PaddedTokenDispatcher
from .experts import is_quantized_experts, plain_experts_config, quantized_experts_config
from .patterns import anchored, kept

ExpertsRecipe = Literal["float8_rowwise", "mxfp8"]


def default_pad_multiple(recipe: str, emulate: bool) -> int:
    """Rows per padded expert group: 16 for FP8 (16-byte alignment), 32 for MXFP8
    (its scaling block along the tokens of the weight-gradient GEMM), 128 for the
    SM100 MXFP8 kernels (TorchTitan's ``mx.py``: the CuTeDSL quantization kernel)."""
    if recipe == "float8_rowwise":
        return 16
    return 32 if emulate else 128


class NemotronHGroupedExpertsConverter(QuantizationConverter):
    """Converts every ``ReluSquaredGroupedExperts`` not kept by ``keep_bf16`` and
    swaps its dispatcher for the padded one."""

    @dataclass(kw_only=True, slots=True)
    class Config(QuantizationConverter.Config):
        recipe: ExpertsRecipe = "mxfp8"
        emulate: bool = False
        keep_bf16: list[str] = field(default_factory=list)
        pad_multiple: int | None = None
        """None: ``default_pad_multiple(recipe, emulate)``."""

    def __init__(self, config: Config):
        if config.recipe not in ("float8_rowwise", "mxfp8"):
            raise ValueError(
                f"low_precision.experts={config.recipe!r}: choose from "
                "['bf16', 'float8_rowwise', 'mxfp8']"
            )
        self.config = config
        self.patterns = anchored(config.keep_bf16)
        self.pad = config.pad_multiple or default_pad_multiple(config.recipe, config.emulate)
        if self.pad % default_pad_multiple(config.recipe, emulate=True):
            raise ValueError(
                f"low_precision.expert_pad_multiple={self.pad}: must be a multiple of "
                f"{default_pad_multiple(config.recipe, emulate=True)} for {config.recipe}"
            )

    def convert(self, model_config):
        n = 0
        for fqn, cfg, parent, attr in list(
            model_config.traverse(ReluSquaredGroupedExperts.Config)
        ):
            if type(cfg) is not ReluSquaredGroupedExperts.Config or kept(fqn, self.patterns):
                continue
            self._pad_dispatch(parent, fqn)
            setattr(
                parent, attr, quantized_experts_config(cfg, self.config.recipe, self.config.emulate)
            )
            n += 1
        logger.info(
            f"low precision: {n} routed-expert layers to {self.config.recipe} "
            f"(token groups padded to {self.pad})"
        )
        return model_config

    def _pad_dispatch(self, routed_experts, fqn: str) -> None:
        dispatcher = routed_experts.token_dispatcher
        if isinstance(dispatcher, DeepEPTokenDispatcher.Config):
            raise ValueError(
                f"low_precision.experts={self.config.recipe!r} with DeepEP token dispatch "
                f"({fqn}): refused, DeepEP cannot pad expert groups for quantized grouped "
                "GEMMs; use moe_comm_backend 'standard' (padded all-to-all) or 'hybridep'"
            )
        if type(dispatcher) is AllToAllTokenDispatcher.Config:
            routed_experts.token_dispatcher = PaddedTokenDispatcher.Config(
                num_experts=dispatcher.num_experts,
                top_k=dispatcher.top_k,
                pad_multiple=self.pad,
            )
        else:
            swap_token_dispatcher(routed_experts, self.pad)  # HybridEP; else raises


def revert(model_config) -> None:
    """This converter's experts and dispatchers back to the plain ones."""
    for _, cfg, parent, attr in list(model_config.traverse(ReluSquaredGroupedExperts.Config)):
        if not is_quantized_experts(cfg):
            continue
        setattr(parent, attr, plain_experts_config(cfg))
        dispatcher = parent.token_dispatcher
        if isinstance(dispatcher, TorchAOTokenDispatcher.Config):
            parent.token_dispatcher = AllToAllTokenDispatcher.Config(
                num_experts=dispatcher.num_experts, top_k=dispatcher.top_k
            )
        elif isinstance(dispatcher, HybridEPTokenDispatcher.Config):
            parent.token_dispatcher = replace(dispatcher, pad_multiple=None)
