"""torchtitan_nemotron3: NVIDIA NemotronH / Nemotron-3 trained natively with TorchTitan.

``model_registry(flavor)`` is the TorchTitan ``ModelSpec``; run configs live in
``config_registry`` (``torchrun -m torchtitan.train --module torchtitan_nemotron3
--config nemotron3_debugmodel``) and ``train_configs/*.toml``.

Shape suffixes on tensor names (``x_BLD``), one meaning per letter everywhere:

    B batch            L sequence length     D hidden size       V vocabulary
    H heads (query heads of attention, or Mamba heads)   P head dim (either)
    G Mamba B/C groups R heads per group     N SSM state size    I Mamba inner width (H·P)
    W one norm group of the inner width (I / G)
    X conv channels (I + 2·G·N)              K conv width
    Z Mamba in_proj outputs (z, x, B, C, dt: 2·I + 2·G·N + H)
    M flattened rows (B·L) where a kernel wants 2-D
    C chunks           Q chunk length
    E experts          F expert hidden width T routed token rows (tokens × top-k)
"""

from torchtitan.components.lora import LoRAConverter
from torchtitan.components.optimizer import register_moe_load_balancing_hook
from torchtitan.models.utils import validate_converter_order
from torchtitan.protocols.model import ModelConfigConverter
from torchtitan.protocols.model_spec import ModelSpec

from .hf import from_pretrained, NemotronHStateDictAdapter, save_pretrained
from .model import NemotronHArgs, NemotronHModel, build_model_config, flavor_args
from .parallelize import parallelize_nemotronh
from .pipeline import pipeline_nemotronh

__all__ = [
    "NemotronHArgs",
    "NemotronHModel",
    "build_model_config",
    "flavor_args",
    "from_pretrained",
    "model_registry",
    "parallelize_nemotronh",
    "save_pretrained",
]


def model_registry(
    flavor: str,
    kernel_backend: str = "auto",
    moe_comm_backend: str = "standard",
    converters: list[ModelConfigConverter.Config] | None = None,
    attn_backend: str = "auto",
    base_dtype: str | None = None,
    nf4_lm_head: bool = False,
) -> ModelSpec:
    """The TorchTitan ModelSpec of a flavor ("debugmodel", "nano-30B"); Mamba2 ops
    from ``kernel_backend`` ("auto": GPU kernels where available, else torch);
    expert-parallel token dispatch by ``moe_comm_backend`` (TorchTitan's
    "standard" all-to-all, or "deepep" / "hybridep" where installed); attention
    by ``attn_backend`` ("auto": FlexAttention with a document block mask on CUDA,
    exact masked SDPA on CPU; or "sdpa", "flex", "varlen").
    ``converters`` transform the config tree as in TorchTitan's models (e.g.
    ``lora.NemotronHLoRAConverter.Config()``); with LoRA the whole base model stays
    fixed, so the MoE routing-bias update is off too. ``base_dtype="nf4"`` (with
    LoRA: QLoRA) stores the frozen linears and routed experts in NF4
    (``qlora/``; lm_head too with ``nf4_lm_head``)."""
    config = build_model_config(
        flavor_args(flavor),
        kernel_backend=kernel_backend,
        moe_comm_backend=moe_comm_backend,
        attn_backend=attn_backend,
    )
    converters = converters or []
    validate_converter_order(converters)
    for c in converters:
        config = c.build().convert(config)
    lora = any(isinstance(c, LoRAConverter.Config) for c in converters)
    if base_dtype not in (None, "bf16", "nf4"):
        raise ValueError(f"base_dtype={base_dtype!r}: None, 'bf16' or 'nf4'")
    if base_dtype == "nf4" and not lora:
        raise ValueError(
            "base_dtype='nf4' quantizes a frozen base: give a LoRA converter "
            "(lora.NemotronHLoRAConverter.Config())"
        )
    config.base_dtype, config.nf4_lm_head = base_dtype, nf4_lm_head
    return ModelSpec(
        name="nemotron3",
        flavor=flavor,
        model=config,
        parallelize_fn=parallelize_nemotronh,
        pipelining_fn=pipeline_nemotronh,
        post_optimizer_build_fn=None if lora else register_moe_load_balancing_hook,
        state_dict_adapter=NemotronHStateDictAdapter,
    )
