"""Incremental decoding equals a full forward over the same tokens (fp32).

Prefill is checked at every prompt position and each step's logits against
``model(prompt + generated)`` at that position, for the debug flavor (every layer
type, chunk 64, a prompt past two chunks), for random small configs (one or two
groups, prompts shorter than the conv window) and with a ``time_step_limit`` that
binds (dt values on both sides of it).
"""

import pytest
import torch
import torch.nn.functional as F
from nemotron_testing import build_model, random_args, randomize_

from torchtitan_nemotron3 import flavor_args
from torchtitan_nemotron3.generate import (
    KVCache,
    MambaState,
    mamba_decode,
    prefill,
    step,
)
from torchtitan_nemotron3.model.mamba2 import Mamba2Mixer

TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def decode_vs_forward(model, prompt_BL: torch.Tensor, n_steps: int, seed: int = 0):
    """Prefill, then ``n_steps`` steps on sampled tokens (sampled so that the
    continuation is not one repeated argmax); returns the worst prefill and step
    errors against the full forward, and the cache."""
    g = torch.Generator().manual_seed(seed)
    cache, prompt_logits_BLV = prefill(model, prompt_BL, all_logits=True)
    tokens, step_logits = [prompt_BL], []
    logits_BV = prompt_logits_BLV[:, -1]
    for _ in range(n_steps):
        token_B = torch.multinomial(logits_BV.softmax(-1), 1, generator=g)[:, 0]
        tokens.append(token_B[:, None])
        logits_BV = step(model, cache, token_B)
        step_logits.append(logits_BV)
    with torch.no_grad():
        full_BLV = model(torch.cat(tokens, dim=1))
    L = prompt_BL.size(1)
    prefill_err = rel_err(prompt_logits_BLV, full_BLV[:, :L])
    step_errs = [rel_err(s, full_BLV[:, L + i]) for i, s in enumerate(step_logits)]
    return prefill_err, step_errs, cache


@pytest.fixture(scope="module")
def debug_model():
    args = flavor_args("debugmodel")
    assert args.hybrid_override_pattern == "MEM*EM-MEM*EMEM-" and args.chunk_size == 64
    model = build_model(args, seed=0, kernel_backend="torch").eval()
    randomize_(model, seed=1)  # unit-scale weights: every term matters
    return model


def test_debug_flavor_prompt_past_chunks(debug_model):
    vocab = debug_model.config.vocab_size
    prompt_BL = torch.randint(
        0, vocab, (2, 150), generator=torch.Generator().manual_seed(2)
    )
    prefill_err, step_errs, cache = decode_vs_forward(
        debug_model, prompt_BL, n_steps=24
    )
    assert prefill_err <= TOL, prefill_err
    assert len(step_errs) == 24 and max(step_errs) <= TOL, step_errs
    assert cache.length == 150 + 24


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_configs(seed):
    args = random_args(seed, n_group=1 + seed % 2)
    model = build_model(args, seed=seed, kernel_backend="torch").eval()
    randomize_(model, seed=seed + 10)
    g = torch.Generator().manual_seed(seed)
    # shorter than the conv window (left padding of the conv state), and a multiple
    # of the chunk size plus one
    for L in (2, 2 * args.chunk_size + 1):
        prompt_BL = torch.randint(0, args.vocab_size, (1, L), generator=g)
        prefill_err, step_errs, _ = decode_vs_forward(model, prompt_BL, 20, seed)
        assert prefill_err <= TOL and max(step_errs) <= TOL, (L, prefill_err, step_errs)


def test_binding_time_step_limit():
    """dt clamped to (0.05, 0.2), with dt values on both sides of it in the run:
    prefill and steps still equal the full forward (which clamps in the scan)."""
    args = random_args(4).replace(time_step_limit=(0.05, 0.2))
    model = build_model(args, seed=4, kernel_backend="torch").eval()
    randomize_(model, seed=14)
    raw_dts = []

    def keep_dt(mixer, _, out_BLZ):
        H = mixer.num_heads
        raw_dts.append(F.softplus(out_BLZ[..., -H:] + mixer.dt_bias).flatten())

    hooks = [
        m.in_proj.register_forward_hook(lambda mod, i, o, m=m: keep_dt(m, i, o))
        for m in model.modules()
        if isinstance(m, Mamba2Mixer)
    ]
    g = torch.Generator().manual_seed(4)
    prompt_BL = torch.randint(0, args.vocab_size, (2, args.chunk_size + 3), generator=g)
    prefill_err, step_errs, _ = decode_vs_forward(model, prompt_BL, 12, seed=4)
    for h in hooks:
        h.remove()
    dt = torch.cat(raw_dts)
    assert (dt < 0.05).float().mean() > 0.05 and (dt > 0.2).float().mean() > 0.05, (
        "the limit does not bind",
        dt.min().item(),
        dt.max().item(),
    )
    assert prefill_err <= TOL and max(step_errs) <= TOL, (prefill_err, step_errs)


def test_step_is_constant_size_in_mamba(debug_model, monkeypatch):
    """A step never runs the chunked scan (no recompute of the prefix), Mamba states
    keep their size while the KV caches grow by one per token."""
    prompt_BL = torch.randint(
        0, 2048, (1, 70), generator=torch.Generator().manual_seed(3)
    )
    cache, logits_BV = prefill(debug_model, prompt_BL, capacity=72)

    def no_scan(*a, **k):
        raise AssertionError("a decode step ran the chunked SSD scan")

    monkeypatch.setattr(mamba_decode, "ssd_scan", no_scan)
    shapes = {
        n: (s.conv_BKX.shape, s.ssm_BHPN.shape)
        for n, s in cache.layers.items()
        if isinstance(s, MambaState)
    }
    args = flavor_args("debugmodel")
    for shape_conv, shape_ssm in shapes.values():
        X = args.mamba_d_inner + 2 * args.n_groups * args.ssm_state_size
        assert shape_conv == (1, args.conv_kernel - 1, X)
        assert shape_ssm == (
            1,
            args.mamba_num_heads,
            args.mamba_head_dim,
            args.ssm_state_size,
        )
    for _ in range(5):  # past the reserved capacity: the KV cache grows
        logits_BV = step(debug_model, cache, logits_BV.argmax(-1))
    for name, state in cache.layers.items():
        if isinstance(state, MambaState):
            assert (state.conv_BKX.shape, state.ssm_BHPN.shape) == shapes[name]
        elif isinstance(state, KVCache):
            assert state.keys().shape[2] == 75 and state.capacity >= 75
    kinds = [type(s).__name__ for s in cache.layers.values()]
    assert kinds.count("MambaState") == 7 and kinds.count("KVCache") == 2
