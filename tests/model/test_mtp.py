"""Multi-token prediction against a reference written here from its definition.

The reference runs each packed document on its own (so no shift can cross a
document) through transformers' NemotronH: the backbone gives h_0 (after its
final norm) and the main logits; the MTP block's layers are a second transformers
NemotronHModel whose layer types are the MTP pattern and whose ``norm_f`` plays
``final_layernorm``. The fusion, the shifts and the loss are plain torch loops:
at depth k a document of n tokens has n - k valid slots t, fed embed(ids[t + k])
and h_{k-1}[t], scored against labels[t + k]. Nothing of the package's MTP code
is used; losses per depth and every gradient must agree to 1e-5 (fp32).
"""

import pytest
import torch
import torch.nn.functional as F
from nemotron_testing import build_model, hf_reference, random_args, randomize_
from test_parity_hf import hf_to_ours_parts, rel_err
from transformers import NemotronHConfig
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHModel

from torchtitan_nemotron3.model.model import seq_idx_from_positions
from torchtitan_nemotron3.model.mtp import mtp_loss
from torchtitan_nemotron3.model.pattern import to_hf_block_types

RTOL = 1e-5
DOCS = [9, 1, 2, 17, 6]  # one row of packed documents, some shorter than D + 1


def mtp_args(seed: int, depths: int, pattern: str = "*E"):
    return random_args(seed, n_group=1, num_layers=6).replace(
        moe_latent_size=16,
        num_nextn_predict_layers=1,
        mtp_hybrid_override_pattern=pattern,
        mtp_num_layers=depths,
        mtp_loss_scaling_factor=0.3,
    )


def rms(x, w, eps):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class Reference:
    """transformers' backbone and MTP layers plus plain fusion tensors."""

    def __init__(self, args, seed):
        torch.manual_seed(seed)
        self.args = args
        self.hf = hf_reference(args)
        randomize_(self.hf, seed)
        cfg = self.hf.config.to_dict()
        cfg["layers_block_type"] = to_hf_block_types(args.mtp_hybrid_override_pattern)
        cfg.pop("num_hidden_layers", None)
        cfg.pop("hybrid_override_pattern", None)
        mtp_cfg = NemotronHConfig(**cfg)
        mtp_cfg._attn_implementation = "sdpa"
        self.block = NemotronHModel(mtp_cfg).float()
        randomize_(self.block, seed + 1)
        H = args.hidden_size
        g = torch.Generator().manual_seed(seed + 2)
        self.enorm = (1 + 0.2 * torch.randn(H, generator=g)).requires_grad_()
        self.hnorm = (1 + 0.2 * torch.randn(H, generator=g)).requires_grad_()
        self.eh_proj = (
            torch.randn(H, 2 * H, generator=g) / (2 * H) ** 0.5
        ).requires_grad_()

    def named_tensors(self):
        """(our name, rows, reference tensor) for every parameter of ours."""
        last = len(self.args.mtp_hybrid_override_pattern) - 1
        for hf_name, t in self.hf.named_parameters():
            for name, rows in hf_to_ours_parts(hf_name, self.args):
                yield name, rows, t
        for hf_name, t in self.block.named_parameters():
            if hf_name == "embeddings.weight":
                continue  # MTP shares the backbone's embedding
            if hf_name == "norm_f.weight":
                yield f"mtp.layers.{last}.final_layernorm.weight", slice(None), t
                continue
            for name, rows in hf_to_ours_parts(hf_name, self.args):
                yield f"mtp.{name}", rows, t
        yield "mtp.layers.0.enorm.weight", slice(None), self.enorm
        yield "mtp.layers.0.hnorm.weight", slice(None), self.hnorm
        yield "mtp.layers.0.eh_proj.weight", slice(None), self.eh_proj
        for hf_name, t in self.hf.named_buffers():
            if hf_name.endswith("e_score_correction_bias"):
                yield hf_to_ours_parts(hf_name, self.args)[0][0], slice(None), t
        for hf_name, t in self.block.named_buffers():
            if hf_name.endswith("e_score_correction_bias"):
                yield (
                    "mtp." + hf_to_ours_parts(hf_name, self.args)[0][0],
                    slice(None),
                    t,
                )

    def losses(self, tokens, labels, docs, depths, scale):
        """(total, main CE, [CE_1..CE_D]), every document on its own."""
        eps = self.args.layer_norm_epsilon
        main_sum, main_n = 0.0, 0
        depth_sum, depth_n = [0.0] * depths, [0] * depths
        start = 0
        for n in docs:
            ids = tokens[:, start : start + n]
            lab = labels[:, start : start + n]
            h = self.hf.model(input_ids=ids).last_hidden_state  # after norm_f
            main_sum = main_sum + F.cross_entropy(
                self.hf.lm_head(h)[0], lab[0], reduction="sum"
            )
            main_n += n
            for k in range(1, depths + 1):
                if n - k <= 0:
                    break  # no slot of this document has a token k ahead
                e = self.hf.model.embeddings(ids[:, k:])
                fused = torch.cat(
                    [rms(e, self.enorm, eps), rms(h[:, : n - k], self.hnorm, eps)], -1
                )
                u = fused @ self.eh_proj.T
                h = self.block(inputs_embeds=u).last_hidden_state  # final_layernorm
                depth_sum[k - 1] = depth_sum[k - 1] + F.cross_entropy(
                    self.hf.lm_head(h)[0], lab[0, k:], reduction="sum"
                )
                depth_n[k - 1] += n - k
            start += n
        main = main_sum / main_n
        per_depth = [s / c for s, c in zip(depth_sum, depth_n, strict=True)]
        return main + scale / depths * sum(per_depth), main, per_depth


def positions_for(docs):
    return torch.cat([torch.arange(n) for n in docs]).unsqueeze(0)


@pytest.mark.parametrize(
    "seed,depths,pattern", [(0, 1, "*E"), (1, 2, "*E"), (2, 2, "ME"), (3, 3, "E*")]
)
def test_mtp_losses_and_grads_match_reference(seed, depths, pattern):
    args = mtp_args(seed, depths, pattern)
    ref = Reference(args, seed)
    ours = build_model(args)
    ours_sd = ours.state_dict()
    mapped = []
    with torch.no_grad():
        for name, rows, t in ref.named_tensors():
            ours_sd[name].copy_(t[rows])
            mapped.append(name)
    assert sorted(mapped) == sorted(ours_sd), sorted(set(ours_sd) ^ set(mapped))

    L = sum(DOCS)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab_size, (1, L), generator=g)
    labels = torch.randint(0, args.vocab_size, (1, L), generator=g)
    positions = positions_for(DOCS)
    ref.hf.train()
    ref.block.train()
    ours.train()

    want, want_main, want_depths = ref.losses(tokens, labels, DOCS, depths, 0.3)
    want.backward()
    outputs = ours(tokens, positions=positions)
    assert isinstance(outputs, list) and len(outputs) == depths + 1
    got, terms = mtp_loss(outputs, labels, seq_idx_from_positions(positions), 0.3)
    got.backward()

    assert rel_err(terms["main"], want_main.detach()) <= RTOL
    for k in range(1, depths + 1):
        assert rel_err(terms[f"mtp_{k}"], want_depths[k - 1].detach()) <= RTOL, k
    assert rel_err(got.detach(), want.detach()) <= RTOL

    params = dict(ours.named_parameters())
    checked = 0
    for name, rows, t in ref.named_tensors():
        if name not in params:
            continue  # buffers
        assert t.grad is not None and t.grad.abs().max() > 0, name
        err = rel_err(params[name].grad, t.grad[rows])
        assert err <= RTOL, (name, err)
        checked += 1
    assert checked == len(params)


def test_mtp_gradients_reach_the_backbone():
    """λ scales how much the MTP depths move the shared weights."""
    args = mtp_args(0, 2)
    tokens = torch.randint(0, args.vocab_size, (2, 24))
    labels = torch.randint(0, args.vocab_size, tokens.shape)
    grads = {}
    for scale in (0.0, 0.3):
        model = build_model(args, seed=1)
        loss, _ = mtp_loss(model(tokens), labels, None, scale)
        loss.backward()
        grads[scale] = {n: p.grad for n, p in model.named_parameters()}
    for name in ("tok_embeddings.weight", "lm_head.weight", "layers.0.norm.weight"):
        assert not torch.equal(grads[0.0][name], grads[0.3][name]), name
    assert all(
        grads[0.0][n] is None or not grads[0.0][n].any()
        for n in grads[0.0]
        if n.startswith("mtp.")
    )


def test_mtp_off_is_the_plain_model():
    args = mtp_args(0, 2)
    plain = build_model(args.replace(mtp_num_layers=0), seed=3)
    assert plain.mtp is None
    with_mtp = build_model(args, seed=3)
    with_mtp.load_state_dict(
        {k: v for k, v in plain.state_dict().items()}, strict=False
    )
    tokens = torch.randint(0, args.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.equal(with_mtp(tokens)[0], plain(tokens))


def test_mtp_parameter_and_flop_counts():
    """One stored block whatever D; per token and depth, 6 × (eh_proj + the
    block's matmuls + lm_head) plus its attention's causal term."""
    from torchtitan_nemotron3.model import build_model_config
    from torchtitan_nemotron3.model.flops import attention_flops_per_token

    args = mtp_args(0, 2)
    H, V = args.hidden_size, args.vocab_size
    q, kv = (
        args.num_attention_heads * args.head_dim,
        args.num_key_value_heads * args.head_dim,
    )
    E, F, S = args.n_routed_experts, args.moe_intermediate_size, args.moe_latent_size
    Fs, K = args.moe_shared_expert_intermediate_size, args.num_experts_per_tok
    attn = 2 * H * q + 2 * H * kv
    moe_active = E * H + K * 2 * F * S + 2 * H * S + 2 * H * Fs
    per_depth_matmul = 2 * H * H + attn + moe_active + H * V
    moe_params = E * 2 * F * S + E * H + 2 * H * S + 2 * H * Fs
    block_params = 2 * H + 2 * H * H + (attn + H) + (moe_params + H) + H

    seq_len = 64
    results = {}
    for depths in (0, 1, 2):
        cfg = build_model_config(args.replace(mtp_num_layers=depths))
        with torch.device("meta"):
            model = cfg.build()
        results[depths] = cfg.get_nparams_and_flops(model, seq_len)
    (p0, f0), (p1, f1), (p2, f2) = results[0], results[1], results[2]
    assert p1 == p2 == p0 + block_params
    attn_cfg = build_model_config(args).mtp.layers[0].mixer
    per_depth = 6 * per_depth_matmul + attention_flops_per_token(attn_cfg, seq_len)
    assert f1 - f0 == per_depth and f2 - f0 == 2 * per_depth


def test_mtp_routing_bias_update_favours_underused_experts():
    """The trainer's aux-loss-free update of the MTP block's MoE (TorchTitan's only
    walks ``model.layers``): bias += coeff · sign(mean load - load), centred, from
    this step's counts, which it then resets. Written out here from the definition."""
    from types import SimpleNamespace

    from torchtitan_nemotron3.train.trainer import NemotronHTrainer

    model = build_model(mtp_args(0, 1), seed=1)
    moes = [b.moe for b in model.mtp.layers.values() if b.moe_enabled]
    assert moes
    g = torch.Generator().manual_seed(0)
    want = []
    for moe in moes:
        E = moe.tokens_per_expert_E.numel()
        counts_E = torch.randperm(E, generator=g).float() * 3  # distinct loads
        moe.tokens_per_expert_E.copy_(counts_E)
        bias_E = torch.randn(E, generator=g)
        moe.expert_bias_E.copy_(bias_E)
        step_E = moe.load_balance_coeff * torch.where(
            counts_E < counts_E.mean(), 1.0, -1.0
        )
        want.append(bias_E + step_E - step_E.mean())
    trainer = SimpleNamespace(
        model_parts=[model],
        parallel_dims=SimpleNamespace(
            ep_enabled=False, tp=1, get_optional_mesh=lambda name: None
        ),
    )
    NemotronHTrainer._update_mtp_expert_bias(trainer)
    for moe, bias_E in zip(moes, want):
        torch.testing.assert_close(moe.expert_bias_E, bias_E, rtol=0, atol=1e-7)
        assert not moe.tokens_per_expert_E.any()
