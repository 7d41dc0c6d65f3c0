"""Batched decoding (``generate/batch.py``): prompts of different lengths decoded as
one batch give, row by row, the greedy tokens each prompt gives alone; a row that
stops leaves the batch without changing the others."""

import torch
from nemotron_testing import build_model

from torchtitan_nemotron3 import flavor_args
from torchtitan_nemotron3.generate import SamplingConfig, generate
from torchtitan_nemotron3.generate.batch import generate_batch


def test_batch_equals_one_by_one():
    model = build_model(
        flavor_args("debugmodel"), seed=0, kernel_backend="torch"
    ).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, 2048, (n,), generator=g).tolist() for n in (5, 17, 9, 30)
    ]
    greedy = SamplingConfig(greedy=True)
    alone = [generate(model, p, greedy, 10).tokens for p in prompts]
    batch = generate_batch(
        model, prompts, greedy, 10, should_stop=lambda i, t: i == 1 and len(t) == 3
    )
    assert batch[1] == alone[1][:3]
    assert [b for i, b in enumerate(batch) if i != 1] == [
        a for i, a in enumerate(alone) if i != 1
    ]
    # a stop token ends its row only
    stop = alone[2][4]
    batch = generate_batch(model, prompts, greedy, 10, stop_ids=[stop])
    for b, a in zip(batch, alone, strict=True):
        cut = a.index(stop) + 1 if stop in a else len(a)
        assert b == a[:cut]
