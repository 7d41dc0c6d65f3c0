"""Choosing the next token from logits: greedy, or temperature + top-p (nucleus).

Sampling draws from an explicit ``torch.Generator`` (seeded once per generation), so
a seed reproduces the same text on the same device, whatever else uses the global RNG.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """``greedy`` (or ``temperature == 0``) takes the argmax; otherwise logits are
    divided by ``temperature`` and sampled from the smallest set of tokens whose
    probability reaches ``top_p`` (1.0: the whole vocabulary)."""

    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0.0:  # also refuses NaN
            raise ValueError(
                f"temperature={self.temperature}: must be >= 0 (0 = greedy)"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0

    def generator(self, device: torch.device | str) -> torch.Generator | None:
        if self.is_greedy:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def top_p_filter(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logits`` with ``-inf`` outside each row's nucleus: the most probable tokens
    whose cumulative probability first reaches ``top_p`` (the top token always stays)."""
    if top_p >= 1.0:
        return logits_BV
    sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
    cum_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
    # drop a token when the ones before it already reach top_p
    drop_sorted_BV = (cum_BV - sorted_BV.softmax(dim=-1)) >= top_p
    drop_BV = drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV)
    return logits_BV.masked_fill(drop_BV, float("-inf"))


def sample(
    logits_BV: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """The next token per row, ``(B,)``."""
    if config.is_greedy:
        return logits_BV.argmax(dim=-1)
    logits_BV = top_p_filter(logits_BV.float() / config.temperature, config.top_p)
    return torch.multinomial(logits_BV.softmax(dim=-1), 1, generator=generator)[:, 0]
