"""``scripts/convert_checkpoint.py dcp-to-hf`` on a LoRA run's DCP checkpoint.

A tiny LoRA model (every layer type, default targets, trained 2 steps so B != 0)
saved with ``dcp.save`` as the trainer stores it: converted, it is bitwise the merged
export of the live model (``lora.export.save_pretrained``), in fp32 and cast to
bf16 (merged before the cast), and loads into transformers with the LoRA model's
logits. ``--adapters_only`` writes what ``lora.peft.save_peft_adapters`` writes. The
run's alpha comes from ``--lora_alpha`` (targets and rank read from the adapters) or
from the run's config function (``--config``; the debug LoRA config), and both give
the same directory. Missing or contradictory LoRA settings stop with one line.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from lora_testing import ALPHA, RANK, args_for_test, base_and_lora, batch, train_steps
from safetensors.torch import load_file

from torchtitan_nemotron3.hf.config import write_hf_config
from torchtitan_nemotron3.lora.export import save_pretrained
from torchtitan_nemotron3.lora.peft import save_peft_adapters

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "convert_checkpoint.py"


def _script():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def convert(*argv) -> int:
    return _script().main(["dcp-to-hf", *map(str, argv), "--no_progress"])


def hub_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k, value in a.items():
        assert value.dtype == b[k].dtype, k
        assert torch.equal(value, b[k]), k


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(args, trained LoRA model, tmp) with tmp/dcp the LoRA model's DCP checkpoint,
    tmp/plain_dcp the base model's, tmp/cfg an HF config.json of the architecture."""
    tmp = tmp_path_factory.mktemp("lora_dcp")
    args = args_for_test(2)
    base, lora = base_and_lora(args, 2)
    train_steps(lora, args, steps=2)
    lora.eval()
    dcp.save(lora.state_dict(), checkpoint_id=str(tmp / "dcp"), no_dist=True)
    dcp.save(base.state_dict(), checkpoint_id=str(tmp / "plain_dcp"), no_dist=True)
    (tmp / "cfg").mkdir()
    write_hf_config(tmp / "cfg", args, torch.float32)
    return args, lora, tmp


def test_lora_dcp_converts_to_the_merged_export(ckpt):
    from transformers import NemotronHForCausalLM

    args, lora, tmp = ckpt
    out = tmp / "hf"
    assert (
        convert(tmp / "dcp", out, "--config_json", tmp / "cfg", "--lora_alpha", ALPHA)
        == 0
    )
    save_pretrained(lora, tmp / "merged")
    converted = hub_tensors(out)
    assert not any("lora" in k for k in converted)
    assert_same_tensors(converted, hub_tensors(tmp / "merged"))
    hf = NemotronHForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = batch(args, 5)
    with torch.no_grad():
        ours, theirs = lora(tokens), hf(tokens).logits
    err = ((ours - theirs).abs().max() / ours.abs().max()).item()
    print(
        f"converted LoRA DCP vs LoRA model, transformers logits: max rel err {err:.2e}"
    )
    assert err <= 1e-5


def test_bf16_export_is_merged_before_the_cast(ckpt):
    _, lora, tmp = ckpt
    out = tmp / "hf_bf16"
    argv = ["--config_json", tmp / "cfg", "--lora_alpha", ALPHA, "--dtype", "bfloat16"]
    assert convert(tmp / "dcp", out, *argv) == 0
    save_pretrained(lora, tmp / "merged_bf16", dtype=torch.bfloat16)
    converted = hub_tensors(out)
    assert_same_tensors(converted, hub_tensors(tmp / "merged_bf16"))
    assert converted["lm_head.weight"].dtype == torch.bfloat16


def test_adapters_only_writes_peft_format(ckpt):
    _, lora, tmp = ckpt
    out = tmp / "peft"
    argv = ["--config_json", tmp / "cfg", "--lora_alpha", ALPHA, "--adapters_only"]
    with pytest.raises(ValueError, match="PEFT_TARGET_MODULES"):
        convert(tmp / "dcp", out, *argv)  # default targets include Mamba out_proj
    assert (
        convert(tmp / "dcp", out, *argv, "--mamba_out_proj", "--base_model", "b") == 0
    )
    save_peft_adapters(
        lora, tmp / "peft_ref", base_model_name_or_path="b", mamba_out_proj=True
    )
    assert_same_tensors(
        load_file(out / "adapter_model.safetensors"),
        load_file(tmp / "peft_ref" / "adapter_model.safetensors"),
    )
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg == json.loads((tmp / "peft_ref" / "adapter_config.json").read_text())
    assert cfg["r"] == RANK and cfg["lora_alpha"] == ALPHA


def test_run_config_and_lora_alpha_give_the_same_export(tmp_path):
    """The debug LoRA config (rank 8, alpha 16): ``--config`` reads its settings;
    ``--flavor debugmodel --lora_alpha 16`` rebuilds them from the adapters."""
    from torchtitan_nemotron3.config_registry import nemotron3_debug_lora

    with torch.device("meta"):
        model = nemotron3_debug_lora().model_spec.model.build()
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_states()
        for name, p in model.named_parameters():
            if name.endswith(".lora_b.weight"):
                p.normal_(0, 0.02)
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert (
        convert(tmp_path / "dcp", tmp_path / "a", "--config", "nemotron3_debug_lora")
        == 0
    )
    assert (
        convert(
            tmp_path / "dcp",
            tmp_path / "b",
            "--flavor",
            "debugmodel",
            "--lora_alpha",
            16,
        )
        == 0
    )
    save_pretrained(model, tmp_path / "ref")
    a = hub_tensors(tmp_path / "a")
    assert_same_tensors(a, hub_tensors(tmp_path / "b"))
    assert_same_tensors(a, hub_tensors(tmp_path / "ref"))


def test_plain_checkpoint_still_converts_and_refuses_lora_options(ckpt):
    _, _, tmp = ckpt
    cfg = ["--config_json", tmp / "cfg"]
    assert convert(tmp / "plain_dcp", tmp / "plain", *cfg) == 0
    assert "config.json" in {p.name for p in (tmp / "plain").iterdir()}
    for extra in (["--lora_alpha", ALPHA], ["--adapters_only"]):
        with pytest.raises(ValueError, match="holds no LoRA adapters"):
            convert(tmp / "plain_dcp", tmp / "x", *cfg, *extra)
    with pytest.raises(ValueError, match="go with --adapters_only"):
        convert(tmp / "dcp", tmp / "x", *cfg, "--lora_alpha", ALPHA, "--mamba_out_proj")
    with pytest.raises(ValueError, match="no such config function"):
        convert(tmp / "dcp", tmp / "x", "--config", "nemotron3_nope")
    with pytest.raises(ValueError, match="has no LoRA converter"):
        convert(tmp / "dcp", tmp / "x", "--config", "nemotron3_debugmodel")


def test_lora_checkpoint_without_alpha_is_one_line_error(ckpt):
    _, _, tmp = ckpt
    proc = subprocess.run(
        [sys.executable, SCRIPT, "dcp-to-hf", tmp / "dcp", tmp / "x",
         "--config_json", tmp / "cfg"],
        check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("convert_checkpoint.py: error:")
    assert "holds LoRA adapters" in lines[0] and "--lora_alpha" in lines[0]
    assert not (tmp / "x").exists()
