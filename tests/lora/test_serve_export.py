"""Serving exports of a (Q)LoRA run: adapters-only checkpoint merged into the bf16
HF base (fp32: exactly W + alpha/r·B A; bf16: that, rounded, with the share of
deltas rounding erases reported and warned about above 1%); assets and the
reasoning parser copied; the PEFT export checked for vLLM."""

import logging

import pytest
import torch
import torch.distributed.checkpoint as dcp
from lora_testing import args_for_test, base_and_lora, lora_config
from safetensors.torch import load_file

from torchtitan_nemotron3 import save_pretrained
from torchtitan_nemotron3.hf import NemotronHStateDictAdapter
from torchtitan_nemotron3.lora.merge import is_adapter_key
from torchtitan_nemotron3.lora.peft import save_peft_adapters
from torchtitan_nemotron3.lora.serve import check_peft_for_vllm, export_merged


def _setup(tmp_path, b_scale):
    args = args_for_test(0)
    base, lora = base_and_lora(args)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if ".lora_b." in n:
                p.copy_(torch.randn(p.shape, generator=g) * b_scale)
    base_dir = tmp_path / "base"
    save_pretrained(base, base_dir, dtype=torch.bfloat16)
    (base_dir / "tokenizer.json").write_text("{}")
    (base_dir / "nano_v3_reasoning_parser.py").write_text("# parser\n")
    adapters = {k: v.clone() for k, v in lora.state_dict().items() if is_adapter_key(k)}
    dcp.save(adapters, checkpoint_id=str(tmp_path / "step-1"), no_dist=True)
    return args, base, lora, base_dir


def _expected(args, lora, base_dir):
    """W (the bf16 hub base, in fp32) + alpha/r·B A, as hub tensors."""
    hub = load_file(str(base_dir / "model.safetensors"))
    cfg = lora_config(args)
    adapter = NemotronHStateDictAdapter(cfg, None)
    ours = adapter.from_hf({k: v.float() for k, v in hub.items()})
    state = {**ours, **{k: v for k, v in lora.state_dict().items() if is_adapter_key(k)}}
    return adapter.to_hf(state), hub  # the LoRA config's adapter merges (merge.py)


def test_fp32_merge_is_exact_and_assets_are_copied(tmp_path):
    args, _, lora, base_dir = _setup(tmp_path, 0.1)
    out = tmp_path / "fp32"
    report = export_merged(tmp_path / "step-1", base_dir, out, lora_config(args),
                           dtype=torch.float32)  # fmt: skip
    got = load_file(str(out / "model.safetensors"))
    want, hub = _expected(args, lora, base_dir)
    changed = 0
    for k, v in want.items():
        torch.testing.assert_close(got[k], v.float(), rtol=0, atol=2e-6, msg=k)
        changed += not torch.equal(got[k], hub[k].float())
    assert changed > 10 and report.erased_share == 0.0
    assert (out / "tokenizer.json").exists()
    assert (out / "nano_v3_reasoning_parser.py").read_text() == "# parser\n"


def test_bf16_merge_reports_erased_deltas_and_warns(tmp_path, caplog):
    args, _, lora, base_dir = _setup(tmp_path, 1e-4)  # tiny deltas
    with caplog.at_level(logging.WARNING):
        report = export_merged(tmp_path / "step-1", base_dir, tmp_path / "bf16",
                               lora_config(args))  # fmt: skip
    got = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    want, _ = _expected(args, lora, base_dir)
    for k, v in want.items():
        assert got[k].dtype == (torch.float32 if "gate" in k else torch.bfloat16), k
        if "gate" not in k:
            assert torch.equal(got[k], v.bfloat16()), k
    print(f"bf16 rounding erased {100 * report.erased_share:.1f}% of "
          f"{report.adapted_elements} adapted elements")  # fmt: skip
    assert report.erased_share > 0.01 and "export in float32" in caplog.text
    # large deltas: almost none erased, no warning
    caplog.clear()
    args, _, lora, base_dir = _setup(tmp_path / "big", 1.0)
    with caplog.at_level(logging.WARNING):
        big = export_merged(tmp_path / "big" / "step-1", base_dir,
                            tmp_path / "big" / "bf16", lora_config(args))  # fmt: skip
    assert big.erased_share < 0.01 and "export in float32" not in caplog.text


def test_peft_export_checked_for_vllm(tmp_path):
    args = args_for_test(0)
    _, lora = base_and_lora(args)
    save_peft_adapters(lora, tmp_path / "peft", mamba_out_proj=True)
    max_rank = check_peft_for_vllm(tmp_path / "peft")
    # the fused in_proj adapter stacks the 5 parts' rank-4 adapters
    assert max_rank == 5 * 4
    cfg_path = tmp_path / "peft" / "adapter_config.json"
    import json

    cfg = json.loads(cfg_path.read_text())
    cfg["alpha_pattern"]["in_proj"] = cfg["alpha_pattern"]["in_proj"] * 2
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="in_proj: alpha/r"):
        check_peft_for_vllm(tmp_path / "peft")


def test_convert_script_merges_into_the_base(tmp_path):
    """``convert_checkpoint.py dcp-to-hf --merge_into_base`` (the QLoRA export from
    the command line) writes what ``export_merged`` writes, plus config.json that
    transformers' config loader reads."""
    import importlib.util
    import json
    from pathlib import Path

    from lora_testing import ALPHA

    script = Path(__file__).resolve().parents[2] / "scripts" / "convert_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_checkpoint", script)
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)

    args, _, lora, base_dir = _setup(tmp_path, 0.1)
    out = tmp_path / "cli"
    argv = ["dcp-to-hf", str(tmp_path / "step-1"), str(out), "--config_json",
            str(base_dir), "--lora_alpha", str(ALPHA), "--merge_into_base",
            str(base_dir), "--dtype", "float32", "--no_progress"]  # fmt: skip
    assert convert.main(argv) == 0
    got = load_file(str(out / "model.safetensors"))
    want, _ = _expected(args, lora, base_dir)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v.float(), rtol=0, atol=2e-6, msg=k)
    assert json.loads((out / "config.json").read_text())["model_type"] == "nemotron_h"
    assert (out / "nano_v3_reasoning_parser.py").exists()
