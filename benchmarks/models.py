"""The implementations compared: our NemotronH, transformers' with our weights, and
mamba-ssm's ``Mamba2`` with our mixer's weights.

transformers is imported before anything of ours: it decides its own kernel paths at
import time, from the install as a user has it (our loader may later register a bare
``mamba_ssm`` package).
"""

import inspect

import transformers  # isort: skip
from transformers import NemotronHConfig, NemotronHForCausalLM  # isort: skip
from transformers.models.nemotron_h import modeling_nemotron_h as hf_modeling  # isort: skip

import torch
from torch import nn

from torchtitan_nemotron3.hf.config import hf_config_from_args
from torchtitan_nemotron3.hf import NemotronHStateDictAdapter
from torchtitan_nemotron3.hf.naming import hub_names_on_disk
from torchtitan_nemotron3.model import build_model_config
from torchtitan_nemotron3.ops import loader

HF_VERSION = transformers.__version__
HF_EXPERTS: set[str] = set()  # transformers' resolved experts implementation(s)


def hf_paths() -> str:
    """Which implementation transformers resolved for each kernel hook."""
    out = []
    for name in (
        "mamba2_split_conv1d_scan_combined",
        "mamba2_chunk_scan",
        "causal_conv1d_fn",
    ):
        fn = getattr(hf_modeling, name, None)
        nonlocals = inspect.getclosurevars(fn).nonlocals if fn else {}
        if "is_new_implementation" in nonlocals:
            side = (
                nonlocals.get("package")
                if nonlocals["is_new_implementation"]
                else "torch"
            )
            out.append(f"{name}={side}")
    return ", ".join(out) or "unknown"


def build_ours(margs, dtype, device, kernel_backend, compile_blocks):
    cfg = build_model_config(margs, kernel_backend=kernel_backend)
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_states()
        for name, p in model.named_parameters():  # D and dt_bias away from their init
            if name.endswith((".D", ".dt_bias")):
                p.add_(0.3 * torch.randn_like(p))
    model = model.to(dtype)
    if compile_blocks:
        for block in model.layers.values():
            block.compile(fullgraph=True)
    return model, cfg


def copy_into_hf(ours: nn.Module, hf: nn.Module) -> None:
    """Our weights into transformers' model, by the package's hub name map
    (``hf/naming.py``): each of transformers' in-memory tensors (``model.`` names,
    3-D experts) is the hub tensor(s) ``hub_names_on_disk`` names, each from our
    adapter's ``to_hf``. Every tensor of each side is used."""
    # Hub-named (packed Mamba2 in_proj/conv1d, one tensor per expert).
    ours_sd = NemotronHStateDictAdapter(ours.config, None).to_hf(ours.state_dict())
    hf_sd = hf.state_dict()
    assert {n for n, _ in hf.named_buffers()} <= set(hf_sd), "non-persistent buffers"
    used = set()
    with torch.no_grad():
        for key, dst in hf_sd.items():
            for hub, index in hub_names_on_disk(key, tuple(dst.shape)):
                src = ours_sd[hub]
                part = dst if index is None else dst[index]
                assert part.shape == src.shape, (key, hub, part.shape, src.shape)
                part.copy_(src)
                used.add(hub)
    assert used == set(ours_sd), f"not in transformers: {sorted(set(ours_sd) - used)}"


def build_hf(margs, ours: nn.Module, dtype, device, compile_blocks):
    fields = hf_config_from_args(margs)
    # inf as such (hf_config_from_args gives the JSON form)
    fields["time_step_limit"] = tuple(margs.time_step_limit)
    cfg = NemotronHConfig(**fields)
    cfg.use_cache = False
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = NemotronHForCausalLM(cfg)
    hf.to_empty(device=device)
    copy_into_hf(ours, hf)
    hf = hf.to(dtype).train()
    HF_EXPERTS.add(str(hf.config._experts_implementation))
    if compile_blocks:
        for block in hf.model.layers:
            block.compile()
    return hf


def build_mamba_ssm_mixer(ours_mixer, margs, dtype, device):
    """mamba-ssm's ``Mamba2`` with our mixer's shapes and weights (norm after gate, in
    groups). Its d_inner is expand·d_model, so it is built at d_model = d_inner/2 and
    its in/out projections are then swapped for ``hidden_size``-wide ones."""
    module, _ = loader.import_bypassing_init(loader.MAMBA_SSM, "modules.mamba2")
    conv_ok = loader.conv_kernels()[0] is not None
    d_inner = margs.mamba_num_heads * margs.mamba_head_dim
    m = module.Mamba2(
        d_model=d_inner // 2,
        expand=2,
        d_state=margs.ssm_state_size,
        d_conv=margs.conv_kernel,
        headdim=margs.mamba_head_dim,
        ngroups=margs.n_groups,
        chunk_size=margs.chunk_size,
        rmsnorm=True,
        norm_before_gate=False,
        dt_limit=tuple(margs.time_step_limit),
        use_mem_eff_path=conv_ok,
        device=device,
        dtype=torch.float32,
    )
    m.in_proj = nn.Linear(
        margs.hidden_size, m.in_proj.out_features, bias=False, device=device
    )
    m.out_proj = nn.Linear(d_inner, margs.hidden_size, bias=False, device=device)
    theirs = m.state_dict()
    with torch.no_grad():
        for name, t in theirs.items():  # in_proj/conv1d: our packed views
            module, _, attr = name.rpartition(".")
            t.copy_(getattr(ours_mixer.get_submodule(module), attr))
    label = "mamba-ssm Mamba2 " + (
        "(fused conv+scan)" if conv_ok else "(torch conv, Triton SSD)"
    )
    return m.to(dtype).train(), label
