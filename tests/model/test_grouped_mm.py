"""The grouped-GEMM custom op behind the relu² experts."""

import torch

from torchtitan_nemotron3.ops.grouped_mm import grouped_mm


def per_expert_reference(x_RD, w_EDF, counts):
    outs, start = [], 0
    for e, n in enumerate(counts):
        outs.append(x_RD[start : start + n] @ w_EDF[e])
        start += n
    return torch.cat(outs)


def test_forward_and_backward_match_per_expert_matmuls():
    g = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 8]  # one expert receives no token
    x = torch.randn(sum(counts), 16, generator=g, requires_grad=True)
    w = torch.randn(4, 24, 16, generator=g, requires_grad=True)  # (E, F, D) as stored
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    out = grouped_mm(x, w.transpose(-2, -1), offs)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)

    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = per_expert_reference(x_ref, w_ref.transpose(-2, -1), counts)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-6, atol=1e-6)
    assert torch.all(w.grad[1] == 0)


def test_expanded_gradient_is_accepted():
    """``out.sum().backward()`` hands the op a zero-stride gradient; the gradients
    are the per-expert loop's."""
    g = torch.Generator().manual_seed(1)
    counts = [3, 5]
    x = torch.randn(8, 16, generator=g, requires_grad=True)
    w = torch.randn(2, 16, 8, generator=g, requires_grad=True)
    grouped_mm(x, w, torch.tensor(counts).cumsum(0).to(torch.int32)).sum().backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    per_expert_reference(x_ref, w_ref, counts).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-6, atol=1e-6)


def test_opcheck_fake_and_autograd_registrations():
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(2, 16, 8, requires_grad=True)
    offs = torch.tensor([3, 8], dtype=torch.int32)
    torch.library.opcheck(torch.ops.nemotron3.grouped_mm.default, (x, w, offs))
