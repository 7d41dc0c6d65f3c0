"""Loglikelihood requests packed into rows: many short sequences share one row, each
starting its own document (``positions`` restart at 0), so the model keeps them apart
exactly as in training (Mamba state reset, document-causal attention) and a packed
row gives every request the logits it would get alone.

A request is ``(inputs, targets)``: the model reads ``inputs`` and the log-probs of
``targets`` are taken at the last ``len(targets)`` positions (lm-eval's
``(context + continuation)[:-1]`` and the continuation).
"""

from dataclasses import dataclass

import torch


@dataclass
class Row:
    """Request indices in a row, and where each starts."""

    requests: list[int]
    starts: list[int]
    length: int = 0


def pack_rows(lengths: list[int], row_tokens: int, pack: bool = True) -> list[Row]:
    """First-fit decreasing: the longest request first, each into the first row with
    room (``row_tokens`` each; a longer request gets a row to itself). ``pack=False``:
    one request per row (in the same order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[Row] = []
    for i in order:
        n = lengths[i]
        row = None
        if pack:
            row = next((r for r in rows if r.length + n <= row_tokens), None)
        if row is None:
            row = Row([], [])
            rows.append(row)
        row.requests.append(i)
        row.starts.append(row.length)
        row.length += n
    return rows


def _batch_tensors(rows: list[Row], inputs: list[list[int]], device):
    """Tokens and positions (B, L) of ``rows``, right-padded with one padding
    document; positions None when every row is one request and none is padded."""
    L = max(r.length for r in rows)
    tokens_BL = torch.zeros(len(rows), L, dtype=torch.long)
    positions_BL = torch.zeros(len(rows), L, dtype=torch.long)
    for b, row in enumerate(rows):
        for i, s in zip(row.requests, row.starts, strict=True):
            n = len(inputs[i])
            tokens_BL[b, s : s + n] = torch.tensor(inputs[i])
            positions_BL[b, s : s + n] = torch.arange(n)
        positions_BL[b, row.length :] = torch.arange(L - row.length)
    single = all(len(r.requests) == 1 and r.length == L for r in rows)
    return tokens_BL.to(device), None if single else positions_BL.to(device)


def _hidden(model, tokens_BL, positions_BL) -> torch.Tensor:
    """The final-norm hidden states (B, L, D): the model's forward without its head
    (the hook the trainer's chunked loss uses)."""
    skip = model._skip_lm_head
    model._skip_lm_head = True
    try:
        h_BLD = model(tokens_BL, positions=positions_BL)
    finally:
        model._skip_lm_head = skip
    return h_BLD[0] if isinstance(h_BLD, list) else h_BLD  # MTP: the main model's first


@torch.no_grad()
def score_requests(
    model,
    inputs: list[list[int]],
    targets: list[list[int]],
    *,
    row_tokens: int,
    rows_per_batch: int = 1,
    pack: bool = True,
    on_batch=None,
) -> list[tuple[float, bool]]:
    """``(sum of log p(targets), whether each target token is the argmax)`` per
    request; the head and an fp32 log-softmax at the target positions only."""
    for i, (x, y) in enumerate(zip(inputs, targets, strict=True)):
        if not y or len(y) > len(x):
            raise ValueError(
                f"request {i}: {len(y)} target tokens for {len(x)} input tokens"
            )
    device = model.lm_head.weight.device
    rows = pack_rows([len(x) for x in inputs], row_tokens, pack)
    out: list[tuple[float, bool] | None] = [None] * len(inputs)
    for k in range(0, len(rows), rows_per_batch):
        batch = rows[k : k + rows_per_batch]
        tokens_BL, positions_BL = _batch_tensors(batch, inputs, device)
        h_BLD = _hidden(model, tokens_BL, positions_BL)
        b_idx, t_idx, want = [], [], []
        for b, row in enumerate(batch):
            for i, s in zip(row.requests, row.starts, strict=True):
                end, n = s + len(inputs[i]), len(targets[i])
                b_idx += [b] * n
                t_idx += range(end - n, end)
                want += targets[i]
        # the head only where a target is scored: with a 131K vocabulary the full
        # (B, L, V) logits would cost more memory than the rest of the forward
        logits_NV = model.lm_head(
            h_BLD[torch.tensor(b_idx), torch.tensor(t_idx)]
        ).float()
        want_N = torch.tensor(want, device=logits_NV.device)
        logp_N = logits_NV.log_softmax(-1).gather(-1, want_N[:, None])[:, 0]
        greedy_N = logits_NV.argmax(-1) == want_N
        logp, greedy = logp_N.double().tolist(), greedy_N.tolist()
        pos = 0
        for row in batch:
            for i in row.requests:
                n = len(targets[i])
                out[i] = (sum(logp[pos : pos + n]), all(greedy[pos : pos + n]))
                pos += n
        if on_batch is not None:
            on_batch(sum(len(r.requests) for r in batch))
    return out
