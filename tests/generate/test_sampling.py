"""Greedy is deterministic and follows the full forward's argmax; seeded sampling
reproduces; top-p keeps exactly the nucleus; bad settings are refused by name."""

import pytest
import torch
from nemotron_testing import build_model, random_args

from torchtitan_nemotron3.generate.loop import generate
from torchtitan_nemotron3.generate.sampling import SamplingConfig, sample, top_p_filter


@pytest.fixture(scope="module")
def model():
    return build_model(random_args(3), seed=3, kernel_backend="torch").eval()


def test_greedy_is_deterministic_and_the_forward_argmax(model):
    prompt = [5, 9, 2, 7, 1, 3, 8, 4, 6, 0, 11]
    greedy = SamplingConfig(greedy=True)
    a = generate(model, prompt, greedy, max_new_tokens=12)
    b = generate(model, prompt, SamplingConfig(temperature=0.0, seed=99), 12)
    assert a.tokens == b.tokens and len(a.tokens) == 12 and a.steps == 11
    with torch.no_grad():
        full_LV = model(torch.tensor([prompt + a.tokens]))[0]
    assert a.tokens == full_LV[len(prompt) - 1 : -1].argmax(-1).tolist()


def test_seeded_sampling_reproduces(model):
    prompt = [1, 2, 3, 4, 5]
    cfg = SamplingConfig(temperature=1.5, top_p=0.9, seed=7)
    a = generate(model, prompt, cfg, max_new_tokens=16)
    torch.manual_seed(123)  # the global RNG plays no part
    b = generate(model, prompt, cfg, max_new_tokens=16)
    c = generate(model, prompt, SamplingConfig(temperature=1.5, top_p=0.9, seed=8), 16)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_stop_token_ends_generation(model):
    prompt = [1, 2, 3]
    free = generate(model, prompt, SamplingConfig(greedy=True), max_new_tokens=8)
    stop = free.tokens[3]
    first = free.tokens.index(stop)
    out = generate(model, prompt, SamplingConfig(greedy=True), 8, stop_ids={stop})
    assert out.stopped and out.tokens == free.tokens[: first + 1]


def test_top_p_keeps_the_nucleus():
    probs_V = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])
    logits_1V = probs_V.log()[None]
    kept = lambda p: (
        torch.isfinite(top_p_filter(logits_1V, p))[0].nonzero()[:, 0].tolist()
    )
    assert kept(0.5) == [1]
    assert kept(0.6) == [1, 3]
    assert kept(0.85) == [1, 2, 3]
    assert kept(1.0) == [0, 1, 2, 3, 4]
    # sampling only ever draws from the nucleus
    g = torch.Generator().manual_seed(0)
    cfg = SamplingConfig(top_p=0.6)
    draws = {sample(logits_1V, cfg, g).item() for _ in range(200)}
    assert draws == {1, 3}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_sampled_frequencies_follow_the_tempered_softmax(temperature):
    """N seeded draws from one row of logits: each token's frequency is within 5
    standard deviations (sqrt(p(1-p)/N), the binomial's) of softmax(logits / T)."""
    n = 40_000
    logits_V = torch.tensor([1.5, 0.8, 0.0, -0.4, -1.0, 0.3])
    want_V = (logits_V / temperature).softmax(-1)
    g = torch.Generator().manual_seed(11)
    draws_N = sample(logits_V.expand(n, -1), SamplingConfig(temperature=temperature), g)
    freq_V = torch.bincount(draws_N, minlength=logits_V.numel()).double() / n
    sigma_V = (want_V * (1 - want_V) / n).sqrt().double()
    assert ((freq_V - want_V.double()).abs() <= 5 * sigma_V).all(), (freq_V, want_V)


def test_temperature_to_zero_is_the_argmax():
    """A tiny temperature (sampling, not the greedy shortcut) draws each row's argmax."""
    g = torch.Generator().manual_seed(0)
    # each row a shuffle of 0, 0.05, ..., 0.75: the top two are 0.05 apart, e^-50 at T
    logits_BV = torch.rand(512, 16, generator=g).argsort(-1).float() * 0.05
    cfg = SamplingConfig(temperature=1e-3)
    assert not cfg.is_greedy
    drawn_B = sample(logits_BV, cfg, cfg.generator("cpu"))
    assert torch.equal(drawn_B, logits_BV.argmax(-1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_p": 0.0}, "top_p=0.0: must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p=1.5: must be in (0, 1]"),
        ({"temperature": -1.0}, "temperature=-1.0: must be >= 0"),
        ({"temperature": float("nan")}, "temperature=nan"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(
        ValueError, match=message.replace("(", r"\(").replace("]", r"\]")
    ):
        SamplingConfig(**kwargs)


def test_bad_generate_arguments(model):
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate(model, [1], SamplingConfig(), max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, [], SamplingConfig(), max_new_tokens=1)
