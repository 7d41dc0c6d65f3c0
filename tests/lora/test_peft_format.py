"""The adapters alone in PEFT's format, for transformers' module names.

Checked by hand: the merged weight of every targeted hub module rebuilt from the
PEFT files (``W_base + lora_alpha/r · lora_B @ lora_A``, with rank/alpha patterns)
equals the merged export's. And by PEFT itself (``peft`` is in the ``test`` extra):
``PeftModel`` on transformers' model gives the LoRA model's logits."""

import json

import pytest
import torch
from lora_testing import args_for_test, base_and_lora, batch, train_steps
from safetensors.torch import load_file

from torchtitan_nemotron3 import save_pretrained as hf_save_pretrained
from torchtitan_nemotron3.lora.converter import (
    DEFAULT_TARGET_MODULES,
    PEFT_TARGET_MODULES,
)
from torchtitan_nemotron3.lora.export import save_pretrained
from torchtitan_nemotron3.lora.peft import PEFT_PREFIX, save_peft_adapters


def _pattern(patterns: dict, module: str, default):
    leaf = module.rsplit(".", 1)[-1]
    for key, value in patterns.items():
        if module == key or leaf == key:
            return value
    return default


def _trained(tmp, targets):
    args = args_for_test(1)
    base, lora = base_and_lora(args, 1, target_modules=list(targets))
    train_steps(lora, args, steps=2)
    lora.eval()
    hf_save_pretrained(base, tmp / "base")
    save_pretrained(lora, tmp / "merged")
    return args, lora, tmp


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Default targets (Mamba out_proj included: written on request)."""
    args, lora, tmp = _trained(tmp_path_factory.mktemp("peft"), DEFAULT_TARGET_MODULES)
    with pytest.raises(ValueError, match="PEFT_TARGET_MODULES"):
        save_peft_adapters(lora, tmp / "peft")
    save_peft_adapters(lora, tmp / "peft", mamba_out_proj=True)
    return args, lora, tmp


@pytest.fixture(scope="module")
def trained_for_peft(tmp_path_factory):
    """PEFT_TARGET_MODULES: what PEFT itself accepts on a Mamba model."""
    args, lora, tmp = _trained(tmp_path_factory.mktemp("peft2"), PEFT_TARGET_MODULES)
    save_peft_adapters(lora, tmp / "peft")
    return args, lora, tmp


@pytest.mark.parametrize("which", ["trained", "trained_for_peft"])
def test_peft_files_rebuild_the_merged_weights(which, request):
    args, _, tmp = request.getfixturevalue(which)
    cfg = json.loads((tmp / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    tensors = load_file(tmp / "peft" / "adapter_model.safetensors")
    base = load_file(tmp / "base" / "model.safetensors")
    merged = load_file(tmp / "merged" / "model.safetensors")
    assert set(cfg["target_modules"]) == {
        k.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        for k in tensors
        if k.endswith("lora_A.weight")
    }
    in_proj = [m for m in cfg["target_modules"] if m.endswith("in_proj")]
    assert in_proj and cfg["rank_pattern"]["in_proj"] == 5 * cfg["r"]
    for module in cfg["target_modules"]:
        # transformers 5 names the backbone ``model``, the hub files ``backbone``
        hub = module.replace("model.", "backbone.", 1) + ".weight"
        assert hub in base, module  # a real module name
        a = tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"]
        b = tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"]
        r = _pattern(cfg["rank_pattern"], module, cfg["r"])
        alpha = _pattern(cfg["alpha_pattern"], module, cfg["lora_alpha"])
        assert a.shape[0] == r and b.shape[1] == r
        rebuilt = base[hub] + alpha / r * (b @ a)
        torch.testing.assert_close(rebuilt, merged[hub], rtol=1e-6, atol=1e-6)
    # The fused in_proj's B is block-diagonal: part p's rows use only its r columns.
    b = tensors[f"{PEFT_PREFIX}{in_proj[0]}.lora_B.weight"]
    I = args.mamba_num_heads * args.mamba_head_dim
    assert torch.count_nonzero(b[:I, cfg["r"] :]) == 0


def test_peft_loads_into_transformers(trained_for_peft):
    import peft
    from transformers import NemotronHForCausalLM

    args, lora, tmp = trained_for_peft
    hf = NemotronHForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf, tmp / "peft").eval()
    tokens = batch(args, 3)
    with torch.no_grad():
        ours, theirs = lora(tokens), model(tokens).logits
    err = ((ours - theirs).abs().max() / ours.abs().max()).item()
    assert err <= 1e-5
