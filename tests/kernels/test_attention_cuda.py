"""The GPU attention backends on a GPU: TorchTitan's compiled ``FlexAttention``
with the document block mask, and flash ``VarlenAttention`` over the documents'
``cu_seqlens``, against the exact masked SDPA, forward and backward, on packed
rows. Skipped without CUDA (the CPU side of the same checks:
``tests/model/test_attention_backends.py``).

Tolerances: flex computes in the inputs' dtype with fp32 softmax; varlen runs
flash in bf16 whatever the inputs, so both are compared in norm."""

import pytest
import torch

from torchtitan_nemotron3.model.attention import DocumentCausalAttention
from torchtitan_nemotron3.model.model import seq_idx_from_positions

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

# Two rows of 1024: documents across the 128-token mask blocks, one-token
# documents, a row that is one document.
DOCS = [[100, 1, 300, 127, 129, 367], [1024]]
TOL = {"flex": 2e-3, "varlen": 2e-2}


def _inputs():
    positions = torch.stack(
        [torch.cat([torch.arange(n) for n in row]) for row in DOCS]
    ).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(2, 1024, h, 64, device="cuda", generator=g) for h in (8, 2, 2)
    )
    return seq_idx_from_positions(positions), q, k, v


def _run(backend: str, dtype: torch.dtype):
    seq_idx, *qkv = _inputs()
    qkv = [t.to(dtype).requires_grad_() for t in qkv]
    inner = DocumentCausalAttention.Config(backend=backend).build()
    out = inner(*qkv, seq_idx_BL=seq_idx)
    out.float().square().sum().backward()
    return out.float(), [t.grad.float() for t in qkv]


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("backend", ["flex", "varlen"])
def test_backend_equals_masked_sdpa(backend):
    dtype = torch.bfloat16 if backend == "varlen" else torch.float32
    ref_out, ref_grads = _run("sdpa", torch.float32)
    out, grads = _run(backend, dtype)
    assert _rel(out, ref_out) <= TOL[backend]
    for name, g, ref in zip("qkv", grads, ref_grads, strict=True):
        assert _rel(g, ref) <= TOL[backend], name


def test_flex_memory_is_linear_in_length():
    """No L×L tensor: peak memory of a flex forward+backward at 4× the length
    grows about 4×, not 16× (the dense boolean mask alone would be 16×)."""

    def peak(L: int) -> int:
        positions = (torch.arange(L, device="cuda") % 4096)[None]
        seq_idx = seq_idx_from_positions(positions)
        q, k, v = (
            torch.randn(1, L, h, 64, device="cuda", requires_grad=True)
            for h in (8, 2, 2)
        )
        inner = DocumentCausalAttention.Config(backend="flex").build()
        inner(q, k, v, seq_idx_BL=seq_idx).sum().backward()  # warm (compile)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        inner(q, k, v, seq_idx_BL=seq_idx).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    small, large = peak(16384), peak(65536)
    assert large / small <= 6, (small, large)
