"""Generation for many prompts at once: each prompt is prefilled alone (exact, no
padding seen by any layer), then the caches are merged into one batch that decodes a
token per row per step.

Merging is exact because each layer's cache is per row: a Mamba state has the same
shape whatever the prompt length (the conv window is already zero-padded on the
left), and an attention cache is left-padded to the longest prompt with those keys
masked (NemotronH attention has no positional encoding, so where a key sits in the
buffer does not matter). A row that stops leaves the batch.
"""

from collections.abc import Callable, Iterable

import torch

from .cache import DecodeCache, KVCache, MambaState
from .decode import prefill, step
from .sampling import SamplingConfig, sample


def merge_caches(caches: list[DecodeCache], capacity: int) -> DecodeCache:
    """One batch of the single-row ``caches``; the KV caches hold ``capacity``
    tokens (longest prompt plus new ones) before they grow."""
    lengths = [c.length for c in caches]
    longest = max(lengths)
    capacity = max(capacity, longest)
    merged = DecodeCache(length=longest, parts=caches[0].parts)
    for name, first in caches[0].layers.items():
        if first is None:
            merged.layers[name] = None
        elif isinstance(first, MambaState):
            merged.layers[name] = MambaState(
                torch.cat([c.layers[name].conv_BKX for c in caches]),
                torch.cat([c.layers[name].ssm_BHPN for c in caches]),
            )
        else:
            k0 = first.keys()
            B, H, P = len(caches), k0.size(1), k0.size(3)
            k_BHTP = k0.new_zeros(B, H, longest, P)
            v_BHTP = k0.new_zeros(B, H, longest, P)
            valid_BT = torch.ones(B, capacity, dtype=torch.bool, device=k0.device)
            for b, (c, n) in enumerate(zip(caches, lengths, strict=True)):
                k_BHTP[b, :, longest - n :] = c.layers[name].keys()[0]
                v_BHTP[b, :, longest - n :] = c.layers[name].values()[0]
                valid_BT[b, : longest - n] = False
            kv = KVCache(k_BHTP, v_BHTP, capacity)
            kv.valid_BT = valid_BT
            merged.layers[name] = kv
    return merged


def select_rows(cache: DecodeCache, rows_B: torch.Tensor) -> None:
    """Keep only the rows ``rows_B`` of every layer's cache."""
    for name, state in cache.layers.items():
        if isinstance(state, MambaState):
            cache.layers[name] = MambaState(
                state.conv_BKX[rows_B], state.ssm_BHPN[rows_B]
            )
        elif isinstance(state, KVCache):
            state.select(rows_B)


@torch.no_grad()
def generate_batch(
    model,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    max_new_tokens: int,
    stop_ids: Iterable[int] = (),
    should_stop: Callable[[int, list[int]], bool] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (a stop token included when one ended it), up to
    ``max_new_tokens``; ``should_stop(i, tokens)`` ends prompt ``i`` early (stop
    strings). Greedy rows give the tokens ``generate`` gives each prompt alone."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if any(not p for p in prompts):
        raise ValueError("a prompt is empty: nothing to condition on")
    device = model.lm_head.weight.device
    stop_ids = set(stop_ids)
    generator = sampling.generator(device)
    caches, logits = [], []
    for p in prompts:
        cache, logits_1V = prefill(
            model, torch.tensor([p], dtype=torch.long, device=device)
        )
        caches.append(cache)
        logits.append(logits_1V)
    cache = merge_caches(caches, max(map(len, prompts)) + max_new_tokens)
    logits_BV = torch.cat(logits)
    out: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # prompt index of each batch row
    while True:
        tokens = sample(logits_BV, sampling, generator).tolist()
        keep = []
        for row, (i, token) in enumerate(zip(active, tokens, strict=True)):
            out[i].append(token)
            done = token in stop_ids or len(out[i]) == max_new_tokens
            if not done and should_stop is not None:
                done = should_stop(i, out[i])
            if not done:
                keep.append(row)
        if not keep:
            return out
        if len(keep) < len(active):
            rows_B = torch.tensor(keep, device=device)
            select_rows(cache, rows_B)
            active = [active[r] for r in keep]
            tokens = [tokens[r] for r in keep]
        logits_BV = step(
            model, cache, torch.tensor(tokens, dtype=torch.long, device=device)
        )
