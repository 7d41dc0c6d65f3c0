"""The generation loop: prefill the prompt, then sample and step until a stop token or
``max_new_tokens``, timing prefill and decoding apart (their speeds differ by orders
of magnitude, so one tokens/s over both would describe neither)."""

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .decode import prefill, step
from .sampling import SamplingConfig, sample


@dataclass
class Generation:
    """``tokens``: the new tokens (stop token included if one ended it);
    ``prefill_s``: seconds for the prompt; ``decode_s``: seconds for the ``steps``
    one-token steps after it."""

    tokens: list[int]
    prompt_len: int
    prefill_s: float
    decode_s: float
    steps: int
    stopped: bool

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_len / max(self.prefill_s, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.steps / max(self.decode_s, 1e-9)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(
    model,
    prompt_ids: list[int],
    sampling: SamplingConfig,
    max_new_tokens: int,
    stop_ids: Iterable[int] = (),
    on_token: Callable[[int], bool | None] | None = None,
) -> Generation:
    """Sample up to ``max_new_tokens`` after ``prompt_ids`` (one row), stopping after
    a token of ``stop_ids``; ``on_token`` sees each new token as it comes (streaming)
    and stops the generation by returning True (stop strings)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if not prompt_ids:
        raise ValueError("the prompt is empty: nothing to condition on")
    device = model.lm_head.weight.device
    stop_ids = set(stop_ids)
    generator = sampling.generator(device)
    tokens_1L = torch.tensor([prompt_ids], dtype=torch.long, device=device)

    _sync(device)
    t0 = time.perf_counter()
    cache, logits_1V = prefill(
        model, tokens_1L, capacity=len(prompt_ids) + max_new_tokens
    )
    _sync(device)
    t1 = time.perf_counter()
    out, steps, stopped = [], 0, False
    while True:
        token_1 = sample(logits_1V, sampling, generator)
        token = int(token_1.item())
        out.append(token)
        if token in stop_ids or (on_token is not None and on_token(token)):
            stopped = True
            break
        if len(out) == max_new_tokens:
            break
        logits_1V = step(model, cache, token_1)
        steps += 1
    _sync(device)
    t2 = time.perf_counter()
    return Generation(out, len(prompt_ids), t1 - t0, t2 - t1, steps, stopped)
