"""LoRA through the real trainer (run_train.sh, torchrun, 2 FSDP ranks on gloo).

One run of the debug LoRA config in fp32: 4 steps, a full DCP checkpoint at step 2
and the merged HF export (``last_save_in_hf``) at step 4. Checked: the loss falls;
the DCP checkpoint holds the adapters; between steps 2 and 4 no base tensor moved
(export vs checkpoint, bitwise, routing bias included); every adapted hub tensor
moved by a matrix of rank <= r per part, i.e. the export is W + alpha/r·B·A (the
merge itself is checked against transformers in test_lora_model.py); the export
loads into transformers; ``scripts/convert_checkpoint.py dcp-to-hf`` turns the step-2
checkpoint into PEFT files (``--adapters_only``) and a merged directory that agree.
"""

import importlib.util
import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from train._harness import REPO_ROOT, run_training

from torchtitan_nemotron3 import from_pretrained
from torchtitan_nemotron3.config_registry import nemotron3_debug_lora
from torchtitan_nemotron3.hf import NemotronHStateDictAdapter

pytestmark = pytest.mark.integration

RANK = 8
OVERRIDES = [
    "--training.steps", "4",
    "--training.local_batch_size", "2",
    "--training.seq_len", "128",
    "--training.mixed_precision_param", "float32",
    "--validator.no_enable",
    "--checkpoint.interval", "2",
    "--debug.seed", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_run")
    losses = run_training(
        REPO_ROOT / "train_configs" / "debug_lora.toml", 2, OVERRIDES, tmp
    )
    return losses, tmp / "outputs" / "checkpoint", (tmp / "train.log").read_text()


# The job's adapter shape (config_registry.nemotron3_debug_lora: rank 8, alpha 16),
# restated here so that a merge dropping or misreading alpha/r cannot agree with itself.
RUN_ALPHA = 16.0


def merged_by_definition(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub tensors of ``W + alpha/r · B A`` for every adapter pair in ``state``
    (our names), computed here in fp64 and then renamed/packed by the plain
    (LoRA-free) adapter."""
    from torchtitan_nemotron3.config_registry import nemotron3_debugmodel

    scale = RUN_ALPHA / RANK
    merged = {}
    for k, v in state.items():
        if ".lora_" in k:
            continue
        prefix = k.removesuffix(".weight")
        a, b = state.get(f"{prefix}.lora_a.weight"), state.get(f"{prefix}.lora_b.weight")
        if a is not None:
            assert a.shape[0] == RANK and b.shape[1] == RANK, (k, a.shape, b.shape)
            v = (v.double() + scale * (b.double() @ a.double())).to(v.dtype)
        merged[k] = v
    assert len(merged) < len(state)
    plain = nemotron3_debugmodel().model_spec.model
    return NemotronHStateDictAdapter(plain, None).to_hf(merged)


def _dcp_model(step_dir) -> dict[str, torch.Tensor]:
    meta = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    state = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if k.split(".", 1)[0] in {"tok_embeddings", "layers", "norm", "lm_head"}
    }
    dcp.load(state, storage_reader=FileSystemReader(str(step_dir)), no_dist=True)
    return state


def test_trains_on_two_fsdp_ranks_with_only_adapters_in_optimizer(run):
    losses, _, log = run
    print("LoRA losses (2 FSDP ranks):", losses)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3, losses
    assert "dp_shard=2" in log
    # 64 adapted Linears in the debug model, two adapter matrices each
    assert "Optimizer AdamW (model_part=0): 128 params" in log


def test_dcp_checkpoint_holds_adapters_and_export_is_merged(run):
    from transformers import NemotronHForCausalLM

    _, ckpt, _ = run
    state = _dcp_model(ckpt / "step-2")
    lora_b = [k for k in state if k.endswith(".lora_b.weight")]
    assert len(lora_b) == 64 and all(state[k].abs().max() > 0 for k in lora_b)
    model_config = nemotron3_debug_lora().model_spec.model
    base_hub = NemotronHStateDictAdapter(model_config, None).to_hf(
        {k: v for k, v in state.items() if ".lora_" not in k}
        | {k: torch.zeros_like(v) for k, v in state.items() if ".lora_b." in k}
        | {k: v for k, v in state.items() if ".lora_a." in k}
    )  # B = 0: the base weights under hub names
    export = load_file(ckpt / "step-4" / "model-00001-of-00001.safetensors")
    assert sorted(export) == sorted(base_hub)
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
    for k, w in export.items():
        if not k.endswith(adapted) or ".experts." in k:
            assert torch.equal(w, base_hub[k]), f"base tensor {k} moved"
            continue
        d = w.double() - base_hub[k].double()
        parts = 5 if k.endswith("in_proj.weight") else 1
        rank = torch.linalg.matrix_rank(d, rtol=1e-5).item()
        assert 0 < rank <= parts * RANK, (k, rank)
    # the exporter the checkpointer calls at the last step (the model's state dict
    # adapter), on the step-2 state, whose adapters the DCP checkpoint holds
    exported = NemotronHStateDictAdapter(model_config, None).to_hf(state)
    want = merged_by_definition(state)
    assert sorted(exported) == sorted(want)
    for k, w in want.items():
        torch.testing.assert_close(exported[k], w, rtol=0, atol=1e-6, msg=k)
    # the step-4 export loads into transformers and runs the same forward as ours
    hf = NemotronHForCausalLM.from_pretrained(ckpt / "step-4", dtype=torch.float32)
    ours = from_pretrained(ckpt / "step-4", kernel_backend="torch").eval()
    tokens = torch.arange(16)[None]
    with torch.no_grad():
        theirs_LV, ours_LV = hf(tokens).logits[0], ours(tokens)[0]
    assert torch.isfinite(theirs_LV).all()
    torch.testing.assert_close(ours_LV, theirs_LV, rtol=1e-4, atol=1e-4)


def test_convert_script_peft_and_merged_agree(run, tmp_path):
    _, ckpt, _ = run
    script = importlib.util.spec_from_file_location(
        "convert_checkpoint", REPO_ROOT / "scripts" / "convert_checkpoint.py"
    )
    convert = importlib.util.module_from_spec(script)
    script.loader.exec_module(convert)
    for what in ("merged", "peft"):
        extra = ["--adapters_only", "--mamba_out_proj"] if what == "peft" else []
        args = ["dcp-to-hf", str(ckpt / "step-2"), str(tmp_path / what)]
        assert convert.main([*args, "--config", "nemotron3_debug_lora", *extra]) == 0
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    peft = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    state = _dcp_model(ckpt / "step-2")
    base = NemotronHStateDictAdapter(
        nemotron3_debug_lora().model_spec.model, None
    ).to_hf(
        {k: (torch.zeros_like(v) if ".lora_b." in k else v) for k, v in state.items()}
    )
    for module in cfg["target_modules"]:
        hub = module.replace("model.", "backbone.", 1) + ".weight"
        leaf = module.rsplit(".", 1)[-1]
        r = cfg["rank_pattern"].get(leaf, cfg["r"])
        alpha = cfg["alpha_pattern"].get(leaf, cfg["lora_alpha"])
        a, b = (peft[f"base_model.model.{module}.lora_{x}.weight"] for x in "AB")
        torch.testing.assert_close(base[hub] + alpha / r * (b @ a), merged[hub])
    # and the merged directory is W + alpha/r·B·A with the run's alpha and rank
    want = merged_by_definition(state)
    assert sorted(merged) == sorted(want)
    for k, w in want.items():
        torch.testing.assert_close(merged[k], w, rtol=0, atol=1e-6, msg=k)


def test_plain_dcp_to_hf_refuses_a_lora_checkpoint(run, tmp_path):
    """dcp_to_hf without the run's LoRA config cannot merge: on a LoRA checkpoint
    it stops naming the adapter tensors, never exports unmerged."""
    from torchtitan_nemotron3.hf.dcp_convert import dcp_to_hf
    from torchtitan_nemotron3.model import flavor_args

    _, ckpt, _ = run
    with pytest.raises(ValueError, match="lora_a"):
        dcp_to_hf(ckpt / "step-2", tmp_path / "x", flavor_args("debugmodel"))


def test_convert_script_from_the_job_file_alone(run, tmp_path):
    """``dcp-to-hf OUT --config_file train_configs/debug_lora.toml`` plus the run's
    overrides, no checkpoint, flavor, alpha or assets: the job's newest complete
    checkpoint (step-2; step-4 is the HF export, no .metadata), merged with the
    job's rank and alpha, with the job's tokenizer, equals the explicit command."""
    _, ckpt, _ = run
    script = importlib.util.spec_from_file_location(
        "convert_checkpoint", REPO_ROOT / "scripts" / "convert_checkpoint.py"
    )
    convert = importlib.util.module_from_spec(script)
    script.loader.exec_module(convert)
    job = str(REPO_ROOT / "train_configs" / "debug_lora.toml")
    overrides = [*OVERRIDES, "--dump_folder", str(ckpt.parent)]
    out = tmp_path / "from_job"
    assert convert.main(["dcp-to-hf", str(out), "--config_file", job, *overrides]) == 0
    explicit = ["dcp-to-hf", str(ckpt / "step-2"), str(tmp_path / "explicit")]
    explicit += ["--flavor", "debugmodel", "--lora_alpha", "16"]
    assert convert.main(explicit) == 0
    a = load_file(out / "model.safetensors")
    b = load_file(tmp_path / "explicit" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "tokenizer.json").is_file()  # the job's hf_assets_path
    assert not (tmp_path / "explicit" / "tokenizer.json").exists()
