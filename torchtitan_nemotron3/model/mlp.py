"""The relu² MLP: NemotronH's dense ``-`` layers and the MoE's shared expert."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from torchtitan.models.common.linear import Linear
from torchtitan.protocols.module import Module


def relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


class ReluSquaredMLP(Module):
    """``down(relu(up(x))²)``: not gated, two matrices."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        up_proj: Linear.Config
        down_proj: Linear.Config

    def __init__(self, config: Config):
        super().__init__()
        self.up_proj = config.up_proj.build()
        self.down_proj = config.down_proj.build()

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(relu2(self.up_proj(x_BLD)))
