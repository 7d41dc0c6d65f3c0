"""Per-rank random-number state, saved with the train state.

TorchTitan 0.3.0 does not save RNG state (its own TODO), so any op that draws
random numbers after a resume (dropout, stochastic rounding, random routing
noise) would differ from an uninterrupted run. ``RngState`` is a ``Stateful``
under the checkpoint key ``rng``: this rank's torch CPU generator, the current
CUDA device's generator, Python's ``random`` and NumPy's global state, as plain
tensors under ``rank_<global rank>`` (DCP keeps each rank's own; a resume on
another world size has no state for some ranks and says so).
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

KEY = "rng"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rank_key() -> str:
    return f"rank_{_rank()}"


def capture() -> dict[str, torch.Tensor]:
    """This process's generators' states as tensors."""
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "python": torch.tensor([version, *py_state], dtype=torch.int64),
        "numpy": torch.tensor([*keys.tolist(), pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
        # random.gauss's cached second value: (has one, value), the same keys every
        # save and no NaN in a checkpoint (tools flag non-finite checkpoint values)
        "python_gauss": torch.tensor(
            [float(gauss is not None), 0.0 if gauss is None else gauss],
            dtype=torch.float64,
        ),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"].to(torch.uint8))
    py = state["python"].tolist()
    has_gauss, gauss = state["python_gauss"].tolist()
    random.setstate((py[0], tuple(py[1:]), gauss if has_gauss else None))
    keys = state["numpy"].tolist()
    np.random.set_state(
        ("MT19937", np.array(keys[:624], dtype=np.uint32), keys[624], keys[625],
         state["numpy_gauss"].item())
    )  # fmt: skip
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8))


_pending: dict[str, torch.Tensor] | None = None


def apply_pending() -> None:
    """Restore the loaded state now (the trainer calls this when a step's first
    batch has been fetched; see ``RngState``)."""
    global _pending
    if _pending is not None:
        restore(_pending)
        _pending = None


class RngState(Stateful):
    """The ``rng`` entry of the checkpoint: ``{"rank_<r>": capture()}``.

    A loaded state is applied when the resumed run's first batch has been
    fetched, not at load: creating the data iterator draws a seed from torch's
    generator, which the uninterrupted run did before the saved step, so a state
    restored at load would be one draw ahead of it."""

    def state_dict(self) -> dict:
        return {rank_key(): capture()}

    def load_state_dict(self, state_dict: dict) -> None:
        global _pending
        _pending = {k: v.clone() for k, v in state_dict[rank_key()].items()}
