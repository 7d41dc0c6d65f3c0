"""Loss-spike guard: skip the update of a step whose loss is far above the recent ones.

OLMo's rule (``SkipStepOptimizer``): a step whose loss exceeds mean + k·σ of the
last ``window`` accepted losses is not applied (k = 6, window 128; no decision
before ``warmup`` losses are known). The step is dropped through the trainer's
non-finite skip path (no optimizer step, no routing-bias update; the step, LR
schedule and data position advance), so the weights afterwards are those of a
run that never took that batch's update. Skipped losses stay out of the window;
``nonfinite.max_consecutive_skips`` stops a run that keeps spiking. The window is
checkpointed (key ``spike``) so a resumed run decides as the uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.stateful import Stateful

KEY = "spike"


@dataclass(kw_only=True, slots=True)
class SpikeConfig:
    enable: bool = False
    """Skip steps whose loss exceeds mean + sigmas·σ of the recent window."""

    sigmas: float = 6.0
    window: int = 128
    """How many recent accepted losses the mean and σ are over."""

    warmup: int = 64
    """Accepted losses needed before the rule applies."""

    def __post_init__(self):
        if not self.sigmas > 0:
            raise ValueError(f"spike.sigmas={self.sigmas}: must be > 0")
        if not 2 <= self.warmup <= self.window:
            raise ValueError(
                f"spike.warmup={self.warmup}, spike.window={self.window}: need "
                "2 <= warmup <= window"
            )


class SpikeGuard(Stateful):
    """The window of accepted losses (a ring buffer) and the skip count."""

    def __init__(self, config: SpikeConfig):
        self.config = config
        self.losses = torch.zeros(config.window, dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.int64)  # accepted losses seen
        self.skipped = torch.zeros((), dtype=torch.int64)

    def threshold(self) -> float | None:
        n = min(int(self.count), self.config.window)
        if n < self.config.warmup:
            return None
        recent = self.losses[:n]
        return float(recent.mean() + self.config.sigmas * recent.std())

    def is_spike(self, loss: float) -> bool:
        """Whether to skip; records an accepted loss in the window."""
        limit = self.threshold()
        if limit is not None and loss > limit:
            self.skipped += 1
            return True
        self.losses[int(self.count) % self.config.window] = loss
        self.count += 1
        return False

    def state_dict(self) -> dict:
        return {"losses": self.losses, "count": self.count, "skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.losses.copy_(state_dict["losses"])
        self.count.copy_(state_dict["count"])
        self.skipped.copy_(state_dict["skipped"])
