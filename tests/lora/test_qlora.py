"""QLoRA: NF4 (torchao) for the frozen base, routed experts included.

NF4 itself (round trip, block sizes of every targeted tensor of three flavors),
the NF4 expert GEMM (bitwise forward, gradients, no bf16 bank kept by autograd),
and the debug model: NF4 vs bf16 base at step 0, adapters at init, and 30 LoRA
steps that learn as on the bf16 base while the NF4 base stays bitwise fixed."""

import re

import pytest
import torch
from qlora_testing import (
    build,
    compare,
    debug_config,
    eval_loss,
    markov_batch,
    nf4_twin,
    train,
)

from torchtitan_nemotron3.model import build_model_config, flavor_args
from torchtitan_nemotron3.ops.grouped_mm import grouped_mm
from torchtitan_nemotron3.qlora import nf4_parameters, nf4_targets
from torchtitan_nemotron3.qlora.experts import nf4_grouped_mm
from torchtitan_nemotron3.qlora.nf4 import (
    NF4Tensor,
    dequantize_rows,
    quantize,
    scaler_block_size,
    tensor_nbytes,
)

V = 64  # the chain's sub-vocabulary (markov_batch)


def test_nf4_round_trip_error_band_and_size():
    g = torch.Generator().manual_seed(0)
    for std in (0.02, 1.0):
        w = (torch.randn(1024, 768, generator=g) * std).bfloat16()
        q = quantize(w, "w")
        back = q.get_original_weight()
        rel = ((back.float() - w.float()).norm() / w.float().norm()).item()
        assert 0.085 <= rel <= 0.10, rel
        assert tensor_nbytes(q) * 8 / w.numel() <= 4.13
        assert torch.equal(q.to(torch.bfloat16), back)
        # our row-range dequantization is torchao's, bitwise
        assert torch.equal(dequantize_rows(q, 0, 1024), back)
        assert torch.equal(dequantize_rows(q, 256, 512), back[256:512])


@pytest.mark.parametrize("flavor", ["debugmodel", "nano-30B", "super-120B"])
def test_every_nf4_target_gets_a_legal_block_size(flavor):
    """On meta, with LoRA and lm_head in NF4: each target's block count is a
    multiple of its scaler block size (what ``to_nf4`` asserts), a power of two
    <= 256; the shapes the default 256 fails on get 128 (Nano) / 32 (debug)."""
    cfg = debug_config(16, 32.0, flavor=flavor)
    with torch.device("meta"):
        model = cfg.build()
    sizes, n = {}, 0
    for fqn, module, names in nf4_targets(model, lm_head=True):
        for name in names:
            p = getattr(module, name)
            sbs = scaler_block_size(p.numel(), f"{fqn}.{name}")
            assert p.numel() % 64 == 0 and (p.numel() // 64) % sbs == 0
            assert sbs & (sbs - 1) == 0 and sbs <= 256
            sizes[f"{fqn}.{name}"] = sbs
            n += 1
    assert any(k.endswith("w1_EFD") for k in sizes) and "lm_head.weight" in sizes
    assert not any(".router." in k or "lora_" in k or "embed" in k for k in sizes)
    dt = next(v for k, v in sizes.items() if k.endswith("in_proj.dt.weight"))
    assert dt == {"debugmodel": 32, "nano-30B": 128, "super-120B": 256}[flavor]
    print(f"{flavor}: {n} NF4 tensors, scaler block sizes {sorted(set(sizes.values()))}")


# dp degrees at which FSDP cannot split a target into whole NF4 blocks (rows or
# 64-blocks not divisible): those tensors stay replicated (``nf4_replicated``).
_UNSPLITTABLE = {
    "nano-30B": {128: {"in_proj.dt.weight"}, 256: {
        "in_proj.dt.weight", "out_proj.weight", "shared_experts.up_proj.weight",
        "shared_experts.down_proj.weight", "o_proj.weight"}},
    "super-120B": {128: set(), 256: {"in_proj.dt.weight"}},
}  # fmt: skip


@pytest.mark.parametrize("flavor", ["nano-30B", "super-120B"])
def test_fsdp_splits_every_nf4_target_into_whole_blocks_at_power_of_two_dp(flavor):
    """FSDP-QLoRA's shard rule, checked by torchao itself: for dp = 2 … 64 every
    NF4 target is ``shardable``, and torchao's ``aten.split`` (what FSDP2's
    ``torch.chunk`` calls) cuts its placeholder into dp row chunks whose codes,
    scalers and factors split evenly; at dp 128 / 256 only the listed tensors
    are not (their rows or blocks do not divide: they stay replicated)."""
    from torchtitan_nemotron3.qlora.nf4 import nf4_placeholder, shardable

    cfg = debug_config(16, 32.0, flavor=flavor)
    with torch.device("meta"):
        model = cfg.build()
    shapes = {}
    for fqn, module, names in nf4_targets(model, lm_head=True):
        for name in names:
            key = re.sub(r"^(mtp\.)?layers\.\d+\.(mixer\.)?", "", f"{fqn}.{name}")
            key = key.replace("routed_experts.inner_experts.", "")
            shapes.setdefault(key, tuple(getattr(module, name).shape))
    for dp in (2, 4, 8, 16, 32, 64, 128, 256):
        bad = {k for k, shape in shapes.items() if not shardable(shape, dp)}
        assert bad == _UNSPLITTABLE[flavor].get(dp, set()), (dp, bad)
        for key, shape in shapes.items():
            if key in bad:
                continue
            q = nf4_placeholder(shape, key, shards=dp)
            chunks = q.split(q.shape[0] // dp)
            assert len(chunks) == dp and chunks[0].shape[0] * dp == q.shape[0]
            assert chunks[0].quantization_factor.numel() * dp == q.quantization_factor.numel()


def test_nf4_refuses_a_tensor_that_is_not_whole_blocks_by_name():
    with pytest.raises(ValueError, match="layers.3.mixer.x.weight has 96 elements"):
        quantize(torch.zeros(3, 32), "layers.3.mixer.x.weight")


def _bank(E=6, F=32, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(E, F, D, generator=g) * 0.05).bfloat16()
    x = torch.randn(52, D, generator=g).bfloat16()
    counts = torch.tensor([7, 0, 21, 12, 3, 9][:E], dtype=torch.int32)  # one empty
    return w, x, torch.cumsum(counts, 0, dtype=torch.int32)


@pytest.mark.parametrize("chunk", [None, 1, 4])  # 4: a later chunk of 2 experts
def test_nf4_experts_forward_bitwise_and_input_grads(chunk):
    """Forward == grouped_mm on the dequantized bank, bitwise (any chunking);
    grad_x within bf16 tolerance of autograd through that bank; the NF4 bank
    gets no gradient."""
    w, x, offs = _bank()
    q = torch.nn.Parameter(quantize(w, "w1"), requires_grad=False)
    bank = q.get_original_weight().view(w.shape)
    xa = x.clone().requires_grad_(True)
    y = nf4_grouped_mm(xa, q, 6, offs, chunk)
    xr = x.clone().requires_grad_(True)
    y_ref = grouped_mm(xr, bank.transpose(-2, -1), offs)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(xa.grad, xr.grad, rtol=1.6e-2, atol=1e-3)
    assert q.grad is None


def test_autograd_keeps_no_bf16_expert_bank():
    """Saved tensors after forward (saved_tensors_hooks): the NF4 bank and
    activations only, never the dequantized [E, F, D] bank."""
    w, x, offs = _bank(E=4, F=64, D=128)
    offs = torch.tensor([10, 20, 30, 40], dtype=torch.int32)
    q1 = torch.nn.Parameter(quantize(w[:, :64, :128], "w1"), requires_grad=False)
    saved = []
    x = torch.randn(40, 128).bfloat16().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t) or t, lambda t: t
    ):
        y = nf4_grouped_mm(x, q1, 4, offs)
    nbytes = sum(tensor_nbytes(t) for t in saved)
    bank_bytes = q1.numel() * 2
    assert not any(
        not isinstance(t, NF4Tensor) and t.numel() >= q1.numel() for t in saved
    )
    assert any(isinstance(t, NF4Tensor) for t in saved)
    assert nbytes <= tensor_nbytes(q1) + x.numel() * 2 + 4 * 4, (nbytes, bank_bytes)
    # the mutation a plain autograd path would be: it keeps the bank
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t) or t, lambda t: t
    ):
        grouped_mm(x, q1.get_original_weight().view(4, 64, 128).transpose(-2, -1), offs)
    assert sum(tensor_nbytes(t) for t in saved) >= bank_bytes
    y.sum().backward()
    assert q1.grad is None


@pytest.fixture(scope="module")
def pretrained():
    """The debug model trained 20 steps on the chain (confident logits), base
    rounded to bf16: the stand-in for a released checkpoint."""
    model = build(debug_config(None))
    train(model, [markov_batch(V, 4, 64, s) for s in range(20)], 3e-3)
    return {k: v.bfloat16().float() for k, v in model.state_dict().items()}


def _lora_on(state, seed=1):
    model = build(debug_config(8, 16.0), seed=seed)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(".lora_" in k for k in missing)
    return model


def test_step0_nf4_base_vs_bf16_base(pretrained):
    """NF4 (every frozen linear + experts; lm_head bf16) vs the bf16 base on the
    same held-out batch: rel err <= 0.12, KL <= 0.01, top-1 >= 0.97, eval loss
    within 1%."""
    ref_model = build(debug_config(None))
    ref_model.load_state_dict(pretrained)
    model = nf4_twin(ref_model)
    assert len(nf4_parameters(model)) > 0
    tok = markov_batch(V, 4, 64, 999)
    ref_model.eval(), model.eval()
    with torch.no_grad():
        ref, x = ref_model(tok[:, :-1]), model(tok[:, :-1])
    rel, kl, top1, ce_ref, ce = compare(ref, x, tok[:, 1:])
    print(f"NF4 vs bf16 base: rel {rel:.4f} KL {kl:.5f} top1 {top1:.4f} "
          f"CE {ce_ref:.4f} -> {ce:.4f}")  # fmt: skip
    assert rel <= 0.12 and kl <= 0.01 and top1 >= 0.97
    assert abs(ce - ce_ref) / ce_ref <= 0.01


def test_qlora_at_init_equals_nf4_base_bitwise(pretrained):
    """B = 0: QLoRA's logits are the NF4 base's, bitwise."""
    base = build(debug_config(None))
    base.load_state_dict(pretrained)
    base_nf4 = nf4_twin(base)
    qlora = nf4_twin(_lora_on(pretrained))
    tok = markov_batch(V, 2, 32, 5)
    with torch.no_grad():
        assert torch.equal(qlora(tok), base_nf4(tok))


def _nf4_inner(model):
    return {
        n: [t.clone() for t in (p.quantized_data, p.quantized_scalers, p.quantization_factor, p.scaler_mean)]
        for n, p in model.named_parameters()
        if isinstance(p, NF4Tensor)
    }  # fmt: skip


def test_qlora_learns_like_lora_on_the_bf16_base(pretrained):
    """30 LoRA steps on a new mixture task: held-out loss down >= 15%, within 10%
    (relative) of the bf16-base run; the NF4 base is bitwise unchanged, no base
    tensor has a gradient, the optimizer holds exactly the adapters."""
    held_out = markov_batch(V, 4, 64, 998, alt=0.45)
    data = [markov_batch(V, 4, 64, 100 + s, alt=0.45) for s in range(30)]
    cut = {}
    for kind in ("bf16", "nf4"):
        model = _lora_on(pretrained)
        if kind == "nf4":
            model = nf4_twin(model)
            before = _nf4_inner(model)
            frozen_plain = {
                n: p.clone() for n, p in model.named_parameters()
                if not p.requires_grad and not isinstance(p, NF4Tensor)
            }  # fmt: skip
        else:
            for n, p in model.named_parameters():
                p.requires_grad_(".lora_" in n)
        l0 = eval_loss(model, held_out)
        opt = train(model, data, 3e-3)
        cut[kind] = 1 - eval_loss(model, held_out) / l0
    in_opt = {id(p) for o in opt.optimizers for g in o.param_groups for p in g["params"]}
    adapters = {id(p) for n, p in model.named_parameters() if ".lora_" in n}
    assert in_opt == adapters
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    after = _nf4_inner(model)
    assert after.keys() == before.keys() and len(after) > 0
    for n, inner in before.items():
        assert all(torch.equal(a, b) for a, b in zip(inner, after[n])), n
    for n, p in model.named_parameters():
        if n in frozen_plain:
            assert torch.equal(p, frozen_plain[n]), n
    print(f"held-out loss cut: bf16 base {cut['bf16']:.3f}, NF4 base {cut['nf4']:.3f}")
    assert cut["nf4"] >= 0.15
    assert abs(cut["nf4"] - cut["bf16"]) <= 0.10 * cut["bf16"]


def test_nf4_replicated_is_what_fsdp_cannot_split():
    """FSDP's ignored NF4 parameters: all of them on one rank; on two, none of a
    meta model prepared for two shards (``prepare_nf4(shards=2)``), and of a
    model quantized before (default scaler blocks) those whose scaler-block
    factors do not split in two: the debug model's Mamba B/C/dt parts and
    attention k/v (one factor each)."""
    from torchtitan_nemotron3.qlora.transform import nf4_replicated, prepare_nf4

    cfg = debug_config(4, 8.0)
    with torch.device("meta"):
        meta = cfg.build()
    prepare_nf4(meta, shards=2)
    assert nf4_replicated(meta, 2) == []
    assert len(nf4_replicated(meta, 1)) == len(nf4_parameters(meta)) > 50
    model = nf4_twin(build(cfg))
    names = {id(p): n for n, p in model.named_parameters()}
    replicated = {names[id(p)] for p in nf4_replicated(model, 2)}
    leaves = {re.sub(r"^layers\.\d+\.mixer\.", "", n) for n in replicated}
    assert leaves == {
        "in_proj.B.weight", "in_proj.C.weight", "in_proj.dt.weight",
        "k_proj.weight", "v_proj.weight",
    }  # fmt: skip
    assert len(replicated) == 7 * 3 + 2 * 2
