"""A packed row gives, per document, the logits of that document run alone."""

import pytest
import torch

from nemotron_testing import build_model, random_args

DOCS = [7, 1, 19, 13]  # lengths straddling chunk boundaries, one single-token document


def positions_for(docs):
    return torch.cat([torch.arange(n) for n in docs])[None]


@pytest.mark.parametrize(
    "pattern,dtype,tol",
    [
        ("MM", torch.float64, 1e-10),
        ("**", torch.float64, 1e-10),
        ("--", torch.float64, 1e-10),
        ("EE", torch.float32, 1e-6),  # grouped GEMM has no fp64 kernel
        ("M*-E", torch.float32, 1e-5),
    ],
)
def test_packed_equals_separate(pattern, dtype, tol):
    args = random_args(0).replace(hybrid_override_pattern=pattern, num_hidden_layers=None)
    model = build_model(args, dtype=dtype).eval()
    tokens = torch.randint(0, args.vocab_size, (1, sum(DOCS)))
    with torch.no_grad():
        packed = model(tokens, positions=positions_for(DOCS))
        start = 0
        for n in DOCS:
            alone = model(tokens[:, start : start + n])
            err = (packed[:, start : start + n] - alone).abs().max() / alone.abs().max()
            assert err <= tol, (pattern, start, err.item())
            start += n


@pytest.mark.parametrize("pattern", ["MM", "**"])
def test_without_positions_documents_leak(pattern):
    """The sequence mixers do mix across documents unless told where they start."""
    args = random_args(0).replace(hybrid_override_pattern=pattern, num_hidden_layers=None)
    model = build_model(args, dtype=torch.float64).eval()
    tokens = torch.randint(0, args.vocab_size, (1, sum(DOCS)))
    with torch.no_grad():
        packed = model(tokens, positions=positions_for(DOCS))
        unpacked = model(tokens)
    second_doc = slice(DOCS[0], sum(DOCS))
    assert (packed[:, second_doc] - unpacked[:, second_doc]).abs().max() > 1e-6
