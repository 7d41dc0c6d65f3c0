"""The chunked SSD against the token-by-token recurrence, and its gradients."""

import pytest
import torch

from torchtitan_nemotron3.ops.conv import causal_conv1d
from torchtitan_nemotron3.ops.ssd import ssd_chunked, ssd_sequential


def random_inputs(Bsz, L, H, P, G, N, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(Bsz, L, H, P, generator=g, dtype=dtype)
    dt = torch.rand(Bsz, L, H, generator=g, dtype=dtype) * 0.5 + 0.01
    A = -torch.rand(H, generator=g, dtype=dtype) * 3 - 0.1
    B = torch.randn(Bsz, L, G, N, generator=g, dtype=dtype)
    C = torch.randn(Bsz, L, G, N, generator=g, dtype=dtype)
    return x, dt, A, B, C


def packed_seq_idx(Bsz, doc_lengths):
    return torch.cat(
        [torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(doc_lengths)]
    ).expand(Bsz, -1)


def recurrence(x, dt, A, B, C, seq_idx=None):
    """The ground truth, written from the definition with nothing from the code
    under test: per row and token, the state restarts at zero where ``seq_idx``
    changes, then ``state = exp(dt A) state + dt x ⊗ B`` and ``y = state · C``;
    head h reads group h // (H / G)."""
    Bsz, L, H, P = x.shape
    G, N = B.shape[2:]
    y = torch.zeros_like(x)
    for b in range(Bsz):
        state = x.new_zeros(H, P, N)
        for t in range(L):
            if seq_idx is not None and t > 0 and seq_idx[b, t] != seq_idx[b, t - 1]:
                state = torch.zeros_like(state)
            for h in range(H):
                g = h // (H // G)
                state[h] = torch.exp(dt[b, t, h] * A[h]) * state[h] + dt[b, t, h] * (
                    x[b, t, h, :, None] * B[b, t, g][None, :]
                )
                y[b, t, h] = state[h] @ C[b, t, g]
    return y


@pytest.mark.parametrize("L,chunk", [(37, 8), (37, 16), (64, 16), (5, 16), (100, 32)])
def test_chunked_equals_sequential(L, chunk):
    inputs = random_inputs(2, L, 4, 3, 2, 5)
    y = ssd_chunked(*inputs, chunk)
    ref = ssd_sequential(*inputs)
    assert (y - ref).abs().max() <= 1e-10 * ref.abs().max()
    truth = recurrence(*inputs)
    assert (ref - truth).abs().max() <= 1e-12 * truth.abs().max()


@pytest.mark.parametrize("docs,chunk", [([10, 20, 7], 8), ([1, 15, 16, 5], 16), ([33, 4], 4)])
def test_chunked_equals_sequential_packed(docs, chunk):
    L = sum(docs)
    inputs = random_inputs(2, L, 4, 3, 2, 5, seed=1)
    seq_idx = packed_seq_idx(2, docs)
    y = ssd_chunked(*inputs, chunk, seq_idx)
    ref = ssd_sequential(*inputs, seq_idx)
    assert (y - ref).abs().max() <= 1e-10 * ref.abs().max()
    truth = recurrence(*inputs, seq_idx)
    assert (ref - truth).abs().max() <= 1e-12 * truth.abs().max()
    # and each document alone gives its slice of the packed result
    start = 0
    for n in docs:
        alone = ssd_chunked(*(t[:, start : start + n] if t.dim() > 1 else t for t in inputs), chunk)
        assert (y[:, start : start + n] - alone).abs().max() <= 1e-10 * ref.abs().max()
        start += n


def test_packing_changes_the_result():
    """Without seq_idx the state leaks across documents: the masking does something."""
    inputs = random_inputs(1, 24, 2, 3, 1, 4)
    seq_idx = packed_seq_idx(1, [10, 14])
    assert (ssd_chunked(*inputs, 8, seq_idx) - ssd_chunked(*inputs, 8)).abs().max() > 1e-3


def test_gradcheck_packed():
    inputs = [t.requires_grad_() for t in random_inputs(1, 11, 2, 2, 1, 3, seed=2)]
    seq_idx = packed_seq_idx(1, [5, 6])
    assert torch.autograd.gradcheck(lambda *a: ssd_chunked(*a, 4, seq_idx), inputs)


def test_gradients_finite_at_document_starts_fp32():
    x, dt, A, B, C = (t.float().requires_grad_() for t in random_inputs(2, 40, 4, 8, 2, 8))
    seq_idx = packed_seq_idx(2, [3, 17, 20])
    ssd_chunked(x, dt, A, B, C, 16, seq_idx).square().sum().backward()
    for t in (x, dt, A, B, C):
        assert torch.isfinite(t.grad).all()


def test_conv_packed_equals_per_document():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 16, generator=g, dtype=torch.float64)
    w = torch.randn(16, 4, generator=g, dtype=torch.float64)
    b = torch.randn(16, generator=g, dtype=torch.float64)
    docs = [2, 13, 15]
    y = causal_conv1d(x, w, b, packed_seq_idx(2, docs).to(torch.int32))
    start = 0
    for n in docs:
        alone = causal_conv1d(x[:, start : start + n], w, b)
        assert (y[:, start : start + n] - alone).abs().max() <= 1e-12
        start += n
    # a single document: the tap-sum path equals F.conv1d
    single = causal_conv1d(x, w, b, torch.zeros(2, 30, dtype=torch.int32))
    assert (single - causal_conv1d(x, w, b)).abs().max() <= 1e-12
