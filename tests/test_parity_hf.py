"""Numerical parity with transformers' NemotronHForCausalLM (fp32, CPU).

The same random weights go into both models; logits and the gradient of every
parameter after one backward must agree to 1e-5 relative. The weight mapping is
written out here by hand (not through our HF adapter) so the test does not trust
the code it checks.
"""

import pytest
import torch
import torch.nn.functional as F

from nemotron_testing import build_model, hf_reference, random_args, randomize_

RTOL = 1e-5


def hf_to_ours_name(hf_name: str) -> str:
    """The HF in-memory name of each parameter/buffer → ours."""
    name = hf_name.removeprefix("model.")
    name = name.replace("embeddings.weight", "tok_embeddings.weight")
    name = name.replace("norm_f.weight", "norm.weight")
    name = name.replace("mixer.gate.e_score_correction_bias", "mixer.expert_bias_E")
    name = name.replace("mixer.gate.weight", "mixer.router.gate.weight")
    name = name.replace("mixer.experts.up_proj", "mixer.routed_experts.inner_experts.w1_EFD")
    name = name.replace("mixer.experts.down_proj", "mixer.routed_experts.inner_experts.w2_EDF")
    return name


def hf_to_ours_parts(hf_name: str, args) -> list[tuple[str, slice]]:
    """(our name, rows of the HF tensor it holds): ours splits the packed Mamba
    ``in_proj`` (z | x | B | C | dt) and ``conv1d`` (x | B | C) into parts."""
    name = hf_to_ours_name(hf_name)
    I = args.mamba_num_heads * args.mamba_head_dim
    GN = args.n_groups * args.ssm_state_size
    for module, parts in (
        ("in_proj", [("z", I), ("x", I), ("B", GN), ("C", GN), ("dt", args.mamba_num_heads)]),
        ("conv1d", [("x", I), ("B", GN), ("C", GN)]),
    ):
        for kind in ("weight", "bias"):
            packed = f".mixer.{module}.{kind}"
            if name.endswith(packed):
                out, start = [], 0
                for part, rows in parts:
                    out.append((name.replace(packed, f".mixer.{module}.{part}.{kind}"), slice(start, start + rows)))
                    start += rows
                return out
    return [(name, slice(None))]


def load_hf_into_ours(hf: torch.nn.Module, ours: torch.nn.Module, args) -> dict[str, list]:
    ours_sd = ours.state_dict()
    mapping = {k: hf_to_ours_parts(k, args) for k in hf.state_dict()}
    assert sorted(n for parts in mapping.values() for n, _ in parts) == sorted(
        ours_sd
    ), "parameter sets differ"
    with torch.no_grad():
        for hf_name, t in hf.state_dict().items():
            for name, rows in mapping[hf_name]:
                assert ours_sd[name].shape == t[rows].shape, hf_name
                ours_sd[name].copy_(t[rows])
    return mapping


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def run_step(model, tokens, labels, **kw):
    logits = model(tokens, **kw)
    logits = logits if isinstance(logits, torch.Tensor) else logits.logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    return logits.detach()


@pytest.mark.parametrize("seed,n_group", [(0, 2), (1, 2), (2, 1), (3, 4)])
def test_logits_and_grads_match_transformers(seed, n_group):
    args = random_args(seed, n_group=n_group, num_layers=7)
    torch.manual_seed(seed)
    hf = hf_reference(args)
    randomize_(hf, seed)
    ours = build_model(args)
    mapping = load_hf_into_ours(hf, ours, args)

    # 2 rows, a length that is not a multiple of the chunk size
    tokens = torch.randint(0, args.vocab_size, (2, 3 * args.chunk_size + 5))
    labels = torch.randint(0, args.vocab_size, tokens.shape)
    hf.train()
    ours.train()
    ref_logits = run_step(hf, tokens, labels)
    logits = run_step(ours, tokens, labels)
    assert rel_err(logits, ref_logits) <= RTOL

    ours_params = dict(ours.named_parameters())
    checked = 0
    for hf_name, p in hf.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, hf_name
        for name, rows in mapping[hf_name]:
            grad = ours_params[name].grad
            assert rel_err(grad, p.grad[rows]) <= RTOL, (name, rel_err(grad, p.grad[rows]))
            checked += 1
    assert checked == len(ours_params)


def test_parity_detects_a_wrong_weight():
    """The comparison above is sharp: perturbing one Mamba weight breaks it."""
    args = random_args(0, num_layers=6)
    hf = hf_reference(args)
    randomize_(hf, 0)
    ours = build_model(args)
    load_hf_into_ours(hf, ours, args)
    mamba = next(i for i, s in enumerate(args.hybrid_override_pattern) if s == "M")
    with torch.no_grad():
        ours.layers[str(mamba)].mixer.D.mul_(1.001)
    tokens = torch.randint(0, args.vocab_size, (1, 20))
    with torch.no_grad():
        assert rel_err(ours(tokens), hf(tokens).logits) > RTOL
