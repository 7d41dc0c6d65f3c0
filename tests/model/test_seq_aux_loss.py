"""NVIDIA's sequence-level MoE balance loss (Megatron's ``seq_aux_loss``).

Per row of T tokens, with p the token's sigmoid scores normalised to sum 1 and
its top-k of p (no correction bias): ``coeff · Σ_e f_e P_e``, f_e = E/(K·T) ·
#tokens choosing e, P_e = mean_t p_te. Checked against loops written here, and
its gradient against an explicit ``CE + scale · Σ_layers aux`` backward.
"""

import torch
import torch.nn.functional as F
from nemotron_testing import build_model

from torchtitan_nemotron3.model import flavor_args
from torchtitan_nemotron3.model.moe import NemotronHMoE, sequence_aux_loss


def reference(scores, top_k, coeff):
    B, T, E = scores.shape
    total = 0.0
    for b in range(B):
        probs = [scores[b, t] / scores[b, t].sum() for t in range(T)]
        counts = [0] * E
        for t in range(T):
            for e in sorted(range(E), key=lambda e: -probs[t][e].item())[:top_k]:
                counts[e] += 1
        for e in range(E):
            f = E / (top_k * T) * counts[e]
            P = sum(probs[t][e] for t in range(T)) / T
            total = total + coeff * f * P
    return total


def test_value_and_gradient_match_the_loops():
    torch.manual_seed(0)
    scores = torch.rand(3, 7, 8, dtype=torch.float64).requires_grad_()
    got = sequence_aux_loss(scores, top_k=2, coeff=1e-4)
    want = reference(scores, 2, 1e-4)
    assert torch.allclose(got, want, rtol=1e-12)
    (g_got,) = torch.autograd.grad(got, scores)
    (g_want,) = torch.autograd.grad(want, scores)
    assert torch.allclose(g_got, g_want, rtol=1e-10)
    # perfectly balanced routing with uniform scores gives coeff exactly
    uniform = torch.full((1, 4, 4), 0.5, dtype=torch.float64)
    assert torch.allclose(
        sequence_aux_loss(uniform, top_k=4, coeff=1e-4), torch.tensor(1e-4).double()
    )


def test_gradients_are_ce_plus_scaled_aux_and_the_loss_is_unchanged():
    args = flavor_args("debugmodel").replace(vocab_size=256)
    tokens = torch.randint(0, args.vocab_size, (2, 32))
    labels = torch.randint(0, args.vocab_size, tokens.shape)
    coeff, scale = 1e-2, 0.25

    with_aux = build_model(args.replace(moe_seq_aux_loss_coeff=coeff), seed=4)
    moes = [m for m in with_aux.modules() if isinstance(m, NemotronHMoE)]
    for m in moes:
        m.aux_loss_scale = scale
    logits = with_aux(tokens)
    F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    assert all(m.last_aux_loss is not None for m in moes)

    plain = build_model(args, seed=4)
    scores = []
    for m in plain.modules():
        if isinstance(m, NemotronHMoE):
            m.router.register_forward_hook(lambda mod, i, out: scores.append(out[2]))
    plain_logits = plain(tokens)
    assert torch.equal(plain_logits, logits)  # the aux loss does not touch outputs
    aux = sum(sequence_aux_loss(s, args.num_experts_per_tok, coeff) for s in scores)
    assert torch.allclose(aux, sum(m.last_aux_loss for m in moes))
    loss = F.cross_entropy(plain_logits.flatten(0, 1), labels.flatten()) + scale * aux
    loss.backward()
    got = dict(with_aux.named_parameters())
    for name, p in plain.named_parameters():
        err = (got[name].grad - p.grad).abs().max() / p.grad.abs().max().clamp_min(
            1e-30
        )
        assert err <= 1e-5, (name, err.item())
    gate = next(n for n in got if n.endswith("router.gate.weight"))
    plain_gate = build_model(args, seed=4)
    F.cross_entropy(plain_gate(tokens).flatten(0, 1), labels.flatten()).backward()
    assert not torch.allclose(
        dict(plain_gate.named_parameters())[gate].grad, got[gate].grad
    )  # the aux term does reach the router


def test_off_by_default_and_eval_adds_nothing():
    args = flavor_args("debugmodel")
    assert args.moe_seq_aux_loss_coeff == 0.0
    for name in ("nano-30B", "super-120B"):
        assert flavor_args(name).moe_seq_aux_loss_coeff == 0.0
    model = build_model(args.replace(moe_seq_aux_loss_coeff=1e-4)).eval()
    with torch.no_grad():
        model(torch.randint(0, args.vocab_size, (1, 16)))
    assert all(
        m.last_aux_loss is None for m in model.modules() if isinstance(m, NemotronHMoE)
    )


def test_mtp_block_sums_its_moe_aux_loss_over_depths():
    args = flavor_args("debugmodel-mtp").replace(
        vocab_size=256, moe_seq_aux_loss_coeff=1e-3
    )
    model = build_model(args, seed=5)
    mtp_moe = next(m for m in model.mtp.modules() if isinstance(m, NemotronHMoE))
    scores = []
    mtp_moe.router.register_forward_hook(lambda mod, i, out: scores.append(out[2]))
    model(torch.randint(0, args.vocab_size, (2, 24)))
    assert len(scores) == args.mtp_num_layers  # the stored block runs once per depth
    want = sum(sequence_aux_loss(s, args.num_experts_per_tok, 1e-3) for s in scores)
    assert torch.allclose(model.mtp.last_aux_loss, want.detach())
    assert torch.allclose(mtp_moe.last_aux_loss, sequence_aux_loss(scores[-1], 2, 1e-3))
