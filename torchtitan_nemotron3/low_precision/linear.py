"""FP8 rowwise and MXFP8 for NemotronH's Linear layers, with exact names kept exact.

TorchTitan 0.3.0's ``Float8LinearConverter`` / ``MXFP8LinearConverter`` are wrong
for NemotronH as they come: unfiltered they convert every Linear (the fp32 router
gate, a ``Float32Linear``, and ``lm_head`` included), their FQN filters match
substrings (``layers.0.mixer.q_proj`` also matches its ``mtp.layers.0...`` copy),
``emulate=True`` swaps the rowwise recipe for tensorwise, and the MXFP8 layer is
built with torchao's AUTO kernels only (no CPU path). This converter builds the
same TorchTitan module classes (so ``has_quantization`` and everything keyed on
them still recognise the result) after its own selection:

* only plain ``Linear.Config`` nodes: the router gate is kept by *type*;
* names matched by ``keep_bf16`` (regexes anchored at both ends) stay exact;
* every GEMM dim a multiple of 16 (FP8) or 32 (MXFP8 block size), else exact.
"""

from dataclasses import dataclass, field
from typing import Literal

import torch
from torchtitan.components.quantization import QuantizationConverter
from torchtitan.components.quantization.float8 import Float8Linear
from torchtitan.components.quantization.mx import MXFP8Linear
from torchtitan.models.common.linear import Linear
from torchtitan.tools.logging import logger

from .patterns import anchored, kept

LinearRecipe = Literal["float8_rowwise", "float8_rowwise_gw_hp", "mxfp8"]

# torchao's Float8LinearConfig recipe names.
_FLOAT8_RECIPES = {"float8_rowwise": "rowwise", "float8_rowwise_gw_hp": "rowwise_with_gw_hp"}
# Every GEMM dim must be a multiple of this: FP8's 16-byte alignment, MXFP8's
# 32-element scaling block.
DIM_MULTIPLE = {"float8_rowwise": 16, "float8_rowwise_gw_hp": 16, "mxfp8": 32}


class NemotronHFloat8Linear(Float8Linear):
    """TorchTitan's ``Float8Linear`` (torchao's), as this package's converter builds it."""

    @dataclass(kw_only=True, slots=True)
    class Config(Float8Linear.Config):
        pass


class NemotronHMXFP8Linear(MXFP8Linear):
    """TorchTitan's ``MXFP8Linear`` with torchao's kernel choice exposed: "emulated"
    (torch code, any device: CPU tests) or "auto" (SM100 kernels)."""

    @dataclass(kw_only=True, slots=True)
    class Config(MXFP8Linear.Config):
        kernel_preference: Literal["auto", "emulated"] = "auto"
        wgrad_with_hp: bool = False

    def __init__(self, config: Config):
        from torchao.prototype.moe_training.mxfp8_linear import MXFP8Linear as AO
        from torchao.quantization.quantize_.common import KernelPreference

        AO.__init__(
            self,
            config.in_features,
            config.out_features,
            bias=config.bias,
            kernel_preference=KernelPreference(config.kernel_preference),
            wgrad_with_hp=config.wgrad_with_hp,
        )


class NemotronHLinearConverter(QuantizationConverter):
    """Converts NemotronH's eligible ``Linear.Config`` nodes to FP8 rowwise or MXFP8."""

    @dataclass(kw_only=True, slots=True)
    class Config(QuantizationConverter.Config):
        recipe: LinearRecipe = "mxfp8"
        emulate: bool = False
        """MXFP8: torchao's emulated kernels (CPU). FP8 rowwise needs no emulation:
        torch runs rowwise ``_scaled_mm`` on CPU."""
        keep_bf16: list[str] = field(default_factory=list)
        """Anchored regexes over module FQNs that stay in high precision."""

    def __init__(self, config: Config):
        if config.recipe not in DIM_MULTIPLE:
            raise ValueError(
                f"low_precision.linear={config.recipe!r}: choose from {sorted(DIM_MULTIPLE)}"
            )
        self.config = config
        self.patterns = anchored(config.keep_bf16)
        if config.recipe in _FLOAT8_RECIPES:
            from torchao.float8 import Float8LinearConfig

            self.torchao_config = Float8LinearConfig.from_recipe_name(
                _FLOAT8_RECIPES[config.recipe]
            )
            if config.recipe == "float8_rowwise":
                # As TorchTitan's converter (pytorch #150859): inductor must round
                # fp8 casts as eager does.
                torch._inductor.config.emulate_precision_casts = True

    def eligible(self, fqn: str, cfg: Linear.Config) -> bool:
        multiple = DIM_MULTIPLE[self.config.recipe]
        return (
            type(cfg) is Linear.Config  # not Float32Linear (router gate), not LoRA
            and not kept(fqn, self.patterns)
            and cfg.in_features % multiple == 0
            and cfg.out_features % multiple == 0
        )

    def _new(self, cfg: Linear.Config) -> Linear.Config:
        common = dict(
            in_features=cfg.in_features,
            out_features=cfg.out_features,
            bias=cfg.bias,
            param_init=cfg.param_init,
        )
        if self.config.recipe == "mxfp8":
            return NemotronHMXFP8Linear.Config(
                **common,
                kernel_preference="emulated" if self.config.emulate else "auto",
            )
        return NemotronHFloat8Linear.Config(**common, _torchao_config=self.torchao_config)

    def convert(self, model_config):
        n = 0
        for fqn, cfg, parent, attr in list(model_config.traverse(Linear.Config)):
            if not self.eligible(fqn, cfg):
                continue
            new = self._new(cfg)
            if isinstance(parent, list):
                parent[attr] = new
            else:
                setattr(parent, attr, new)
            n += 1
        logger.info(f"low precision: {n} Linear layers to {self.config.recipe}")
        return model_config


def revert(model_config) -> None:
    """This converter's Linear configs back to plain ``Linear.Config``."""
    ours = (NemotronHFloat8Linear.Config, NemotronHMXFP8Linear.Config)
    for _, cfg, parent, attr in list(model_config.traverse(Linear.Config)):
        if isinstance(cfg, ours):
            plain = Linear.Config(
                in_features=cfg.in_features,
                out_features=cfg.out_features,
                bias=cfg.bias,
                param_init=cfg.param_init,
            )
            if isinstance(parent, list):
                parent[attr] = plain
            else:
                setattr(parent, attr, plain)
