"""LoRA on NemotronH in one process (fp32, CPU): exact start, what trains, what the
optimizer holds, and the merged HF export against transformers."""

import pytest
import torch
from lora_testing import args_for_test, base_and_lora, batch, train_steps
from safetensors.torch import load_file

from torchtitan_nemotron3 import save_pretrained as hf_save_pretrained
from torchtitan_nemotron3.hf import NemotronHStateDictAdapter
from torchtitan_nemotron3.lora import lora_scalings
from torchtitan_nemotron3.lora.export import merged_model, save_pretrained

RTOL = 1e-5


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def is_adapter(name: str) -> bool:
    return ".lora_a." in name or ".lora_b." in name


@pytest.mark.parametrize("seed", [0, 1])
def test_step0_logits_equal_base_exactly(seed):
    """B = 0 at init: the LoRA model's logits are the base model's, bitwise."""
    args = args_for_test(seed)
    base, lora = base_and_lora(args, seed)
    tokens = batch(args, seed)
    with torch.no_grad():
        assert torch.equal(lora(tokens), base(tokens))


def test_only_adapters_train_and_optimizer_holds_only_adapters():
    args = args_for_test(0)
    _, lora = base_and_lora(args)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in lora.named_parameters() if is_adapter(n)}
    # 2 adapters per adapted Linear, one scaling each
    assert len(trainable) == 2 * len(lora_scalings(lora.config))
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    opt, _ = train_steps(lora, args, steps=3)
    in_opt = {
        id(p) for o in opt.optimizers for g in o.param_groups for p in g["params"]
    }
    assert in_opt == {id(p) for n, p in lora.named_parameters() if is_adapter(n)}
    after = lora.state_dict()
    for name, value in before.items():
        if is_adapter(name):
            if ".lora_b." in name:
                assert not torch.equal(value, after[name]), f"{name} did not train"
        else:
            assert torch.equal(value, after[name]), f"base tensor {name} changed"


def test_merged_export_matches_transformers(tmp_path):
    """After training, the merged hub export loads into transformers'
    NemotronHForCausalLM and gives the LoRA model's logits."""
    from transformers import NemotronHForCausalLM

    args = args_for_test(2)
    base, lora = base_and_lora(args, 2)
    train_steps(lora, args, steps=3)
    lora.eval()
    save_pretrained(lora, tmp_path / "merged")
    hf = NemotronHForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    tokens = batch(args, 7)
    with torch.no_grad():
        ours = lora(tokens)
        theirs = hf.eval()(tokens).logits
        base_logits = base(tokens)
    err = rel_err(theirs, ours)
    print(f"merged export vs transformers: max rel err {err:.2e}")
    assert err <= RTOL
    assert rel_err(base_logits, ours) > 1e-3  # the adapters did change the model
    # Every adapted hub tensor differs from the base's, every other one is the base's.
    hf_save_pretrained(base, tmp_path / "base")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    plain = load_file(tmp_path / "base" / "model.safetensors")
    adapted = (
        "in_proj.weight",
        "out_proj.weight",
        "q_proj.weight",
        "k_proj.weight",
        "v_proj.weight",
        "o_proj.weight",
        "up_proj.weight",
        "down_proj.weight",
    )
    for k, v in merged.items():
        if k.endswith(adapted) and ".experts." not in k:
            assert not torch.equal(v, plain[k]), k
        else:
            assert torch.equal(v, plain[k]), k


def test_torchtitan_adapter_to_hf_is_the_merged_export(tmp_path):
    """TorchTitan's last_save_in_hf path (state dict adapter of the converted
    config, whole state dict) writes the same tensors as the merged save_pretrained."""
    args = args_for_test(3)
    _, lora = base_and_lora(args, 3)
    train_steps(lora, args, steps=2)
    hub = NemotronHStateDictAdapter(lora.config, None).to_hf(lora.state_dict())
    assert not any("lora" in k for k in hub)
    hf_save_pretrained(merged_model(lora), tmp_path / "m")
    saved = load_file(tmp_path / "m" / "model.safetensors")
    assert sorted(saved) == sorted(hub)
    for k, v in hub.items():
        assert torch.equal(saved[k], v.to(saved[k].dtype)), k


def test_plain_save_pretrained_refuses_a_lora_model(tmp_path):
    """hf.save_pretrained writes one hub tensor at a time: it must not export a
    LoRA model unmerged; the error names the merging entry point."""
    args = args_for_test(0)
    _, lora = base_and_lora(args)
    with pytest.raises(ValueError, match="lora.export.save_pretrained"):
        hf_save_pretrained(lora, tmp_path / "x")


def test_initial_hf_load_keeps_adapters_at_init(tmp_path):
    """What TorchTitan's initial_load_in_hf does (to_hf → read → from_hf →
    load_state_dict(strict=False)): base weights from the hub checkpoint, adapters
    untouched (B stays 0), so step-0 logits are the checkpoint's."""
    import torch.distributed.checkpoint as dcp

    from torchtitan_nemotron3.hf.storage import NemotronHStorageReader

    args = args_for_test(4)
    base, _ = base_and_lora(args, 4)
    hf_save_pretrained(base, tmp_path / "hub")
    _, lora = base_and_lora(args, 5)  # other base weights, fresh adapters
    adapters = {k: v.clone() for k, v in lora.state_dict().items() if is_adapter(k)}
    adapter = NemotronHStateDictAdapter(lora.config, None)
    hub = adapter.to_hf(lora.state_dict())
    dcp.load(
        hub, storage_reader=NemotronHStorageReader(str(tmp_path / "hub")), no_dist=True
    )
    lora.load_state_dict(adapter.from_hf(hub), strict=False)
    for k, v in adapters.items():
        assert torch.equal(lora.state_dict()[k], v), k
    tokens = batch(args, 4)
    with torch.no_grad():
        assert torch.equal(lora(tokens), base(tokens))


def test_incremental_decoding_applies_the_adapters():
    """The decoding engine calls the in_proj parts as modules, so a trained LoRA
    model decodes exactly like its full forward (which differs from the base)."""
    from torchtitan_nemotron3.generate import prefill, step

    args = args_for_test(1)
    base, lora = base_and_lora(args, 1)
    train_steps(lora, args, steps=2)
    lora.eval()
    prompt = batch(args, 5, b=1, seq=20)
    cache, logits = prefill(lora, prompt, all_logits=True)
    token = logits[:, -1].argmax(-1)
    stepped = step(lora, cache, token)
    with torch.no_grad():
        full = lora(torch.cat([prompt, token[:, None]], dim=1))
        plain = base(torch.cat([prompt, token[:, None]], dim=1))
    assert rel_err(logits, full[:, :-1]) <= RTOL
    assert rel_err(stepped, full[:, -1]) <= RTOL
    assert rel_err(plain[:, -1], full[:, -1]) > 1e-3
