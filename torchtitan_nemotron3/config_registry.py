"""Run configs as TorchTitan config functions.

``torchrun -m torchtitan.train --module torchtitan_nemotron3 --config <function>``
(TorchTitan imports this module and calls the function); ``train_configs/*.toml``
start from these and override fields. Each function returns a complete
``NemotronHTrainer.Config``; on a machine without CUDA it is adjusted to run on CPU/gloo.
"""

import dataclasses

import torch

from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
from torchtitan.components.validate import Validator
from torchtitan.config import ParallelismConfig, TrainingConfig
from torchtitan.distributed.activation_checkpoint import SelectiveAC

from . import model_registry
from .data.pretrain import PretrainDataLoader
from .data.validation import NamedSetsValidator
from .sft.assets import ensure_debug_sft_assets
from .sft.dataloader import ChatSFTDataLoader
from .sft.render import ChatTemplateConfig
from .train import cpu_compat
from .train.assets import use_debug_pretraining_data
from .train.trainer import NemotronHTrainer


def _chunked_loss(model_spec) -> ChunkedLossWrapper.Config:
    """lm_head + cross-entropy per sequence chunk: a 131K vocabulary never
    materialises full [B, L, V] logits."""
    return ChunkedLossWrapper.Config(
        loss_fn=CrossEntropyLoss.Config(global_vocab_size=model_spec.model.vocab_size)
    )


def _for_this_machine(config: NemotronHTrainer.Config) -> NemotronHTrainer.Config:
    cpu_compat.apply()  # feature-detected: a no-op where nothing is missing
    if not torch.cuda.is_available():
        cpu_compat.adjust_config_for_cpu(config)
    return config


def nemotron3_debugmodel() -> NemotronHTrainer.Config:
    """16-layer NemotronH (every layer type, 8 experts top-2) on a small offline
    corpus and tokenizer generated on first use, the corpus pre-tokenized into
    Megatron's format and read by the pretraining loader: trains on a laptop CPU."""
    model_spec = model_registry("debugmodel")
    config = NemotronHTrainer.Config(
        model_spec=model_spec,
        loss=_chunked_loss(model_spec),
        metrics=MetricsProcessor.Config(log_freq=1),
        dataloader=PretrainDataLoader.Config(),
        validator=NamedSetsValidator.Config(
            dataloader=PretrainDataLoader.Config(split="valid")
        ),
        optimizer=default_adamw(lr=3e-3),
        lr_scheduler=LRSchedulersContainer.Config(
            warmup_steps=2, decay_ratio=0.8, decay_type="linear", min_lr_factor=0.1
        ),
        training=TrainingConfig(local_batch_size=4, seq_len=256, steps=20),
        parallelism=ParallelismConfig(spmd_backend="partial_dtensor"),
        checkpoint=CheckpointManager.Config(interval=10, last_save_model_only=False),
        activation_checkpoint=SelectiveAC.Config(),
    )
    use_debug_pretraining_data(config)
    return _for_this_machine(config)


def nemotron3_nano_30b(moe_comm_backend: str = "standard") -> NemotronHTrainer.Config:
    """Nemotron-3-Nano-30B-A3B on one 8-GPU node in the layout the published
    throughputs use: experts over the node (EP=8, 16 experts per GPU), the dense
    part FSDP over the same 8 ranks; bf16 compute, seq 8192, continuing from the
    released HF checkpoint (set ``checkpoint.initial_load_path`` to the downloaded
    safetensors directory)."""
    return _continued_pretraining(
        "nano-30B", "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", moe_comm_backend
    )


def nemotron3_super_120b() -> NemotronHTrainer.Config:
    """Nemotron-3-Super-120B-A12B (latent MoE, 512 experts, MTP applied twice
    with λ = 0.3) continued from the released HF checkpoint; the layout comes
    from the job file (``train_configs/nemotron3-super-120B.toml``: 64 GPUs)."""
    return _continued_pretraining("super-120B", "NVIDIA-Nemotron-3-Super-120B-A12B-BF16")


def nemotron3_ultra_550b() -> NemotronHTrainer.Config:
    """Nemotron-3-Ultra-550B-A55B, as ``nemotron3_super_120b`` (flavor from
    copies of its config.json: check it against the release)."""
    return _continued_pretraining("ultra-550B", "NVIDIA-Nemotron-3-Ultra-550B-A55B-BF16")


DEFAULT_BLEND = "./data/train_text_document"


def _continued_pretraining(
    flavor: str, hub_name: str, moe_comm_backend: str = "standard"
) -> NemotronHTrainer.Config:
    """A released model continued from its HF checkpoint in
    ``./assets/hf/<hub_name>`` on a pre-tokenized blend (``dataloader.blend``,
    default ``./data/train_text_document``: ``scripts/prepare_data.py`` writes
    it): bf16 compute, fp32 master weights and reductions, seq 8192, EP=8 with
    FSDP over all ranks, selective AC, fp32 HF export at the end. Validation
    (off by default) reads ``validator.sets``."""
    model_spec = model_registry(flavor, moe_comm_backend=moe_comm_backend)
    config = NemotronHTrainer.Config(
        model_spec=model_spec,
        loss=_chunked_loss(model_spec),
        hf_assets_path=f"./assets/hf/{hub_name}",
        metrics=MetricsProcessor.Config(log_freq=10),
        dataloader=PretrainDataLoader.Config(blend=DEFAULT_BLEND),
        validator=NamedSetsValidator.Config(
            enable=False,
            freq=100,
            steps=10,
            dataloader=PretrainDataLoader.Config(split="valid", infinite=False),
        ),
        optimizer=default_adamw(lr=1e-5),
        lr_scheduler=LRSchedulersContainer.Config(
            warmup_steps=100, decay_ratio=0.9, decay_type="cosine", min_lr_factor=0.1
        ),
        training=TrainingConfig(
            local_batch_size=1,
            seq_len=8192,
            steps=1000,
            mixed_precision_param="bfloat16",
            mixed_precision_reduce="float32",
            # TorchTitan's whole-step CUDA graphs cannot hold the all-to-all
            # dispatcher's host sync on the token counts.
            disable_cuda_graphs=True,
        ),
        parallelism=ParallelismConfig(
            spmd_backend="partial_dtensor",
            data_parallel_shard_degree=-1,
            expert_parallel_degree=8,
        ),
        checkpoint=CheckpointManager.Config(
            enable=True,
            interval=500,
            initial_load_model_only=True,
            initial_load_in_hf=True,
            last_save_model_only=True,
            last_save_in_hf=True,
            # TorchTitan casts every tensor, the fp32 router (gate and bias)
            # included, to export_dtype before our adapter sees it; float32 keeps
            # the router exact. For a bf16 export with an exact router use
            # scripts/convert_checkpoint.py dcp-to-hf --dtype bfloat16.
            export_dtype="float32",
        ),
        activation_checkpoint=SelectiveAC.Config(),
    )
    return _for_this_machine(config)


def nemotron3_nano_30b_deepep() -> NemotronHTrainer.Config:
    """``nemotron3_nano_30b`` with DeepEP's token dispatch (needs ``deep_ep``)."""
    return nemotron3_nano_30b(moe_comm_backend="deepep")


def nemotron3_nano_30b_hybridep() -> NemotronHTrainer.Config:
    """``nemotron3_nano_30b`` with HybridEP's token dispatch (needs ``deep_ep``'s
    hybrid-ep branch; for NVLink-72 systems)."""
    return nemotron3_nano_30b(moe_comm_backend="hybridep")


def nemotron3_debug_sft() -> NemotronHTrainer.Config:
    """Multi-turn chat SFT of the debug model, offline: generated conversations with
    <think> reasoning (train + held-out validation), the debug tokenizer with a
    ChatML template; loss on assistant tokens only, packed rows, validation every 10
    steps. Starts from random weights (the point is the data path), so the
    assistant-token loss falls from ~ln(2048)."""
    tokenizer_dir, chat_dir = ensure_debug_sft_assets()
    model_spec = model_registry("debugmodel")

    def chat(split: str) -> ChatSFTDataLoader.Config:
        return ChatSFTDataLoader.Config(
            dataset_path=chat_dir,
            split=split,
            # Every assistant turn is trained, so keep every turn's reasoning (the
            # template's default would train earlier turns as "<think></think>").
            template=ChatTemplateConfig(truncate_history_thinking=False),
            log_every_rows=40,
        )

    config = NemotronHTrainer.Config(
        model_spec=model_spec,
        hf_assets_path=tokenizer_dir,
        loss=_chunked_loss(model_spec),
        metrics=MetricsProcessor.Config(log_freq=1),
        dataloader=chat("train"),
        optimizer=default_adamw(lr=3e-3),
        lr_scheduler=LRSchedulersContainer.Config(
            warmup_steps=2, decay_ratio=0.8, decay_type="linear", min_lr_factor=0.1
        ),
        training=TrainingConfig(local_batch_size=4, seq_len=256, steps=30),
        parallelism=ParallelismConfig(spmd_backend="partial_dtensor"),
        checkpoint=CheckpointManager.Config(interval=10, last_save_model_only=False),
        activation_checkpoint=SelectiveAC.Config(),
        validator=Validator.Config(
            enable=True, freq=10, steps=2, dataloader=chat("validation")
        ),
    )
    return _for_this_machine(config)


def nemotron3_nano_30b_sft() -> NemotronHTrainer.Config:
    """Full fine-tune of Nemotron-3-Nano-30B-A3B on chat data, from the released HF
    checkpoint, in ``nemotron3_nano_30b``'s layout (EP=8 + FSDP over one node): the
    model's own chat template, assistant-token loss, packed 8192-token rows, a
    held-out split evaluated every 100 steps. Data: ``dataset_path`` (default
    ``./data/sft``, files ``train*.jsonl|parquet`` and ``validation*``; or a hub
    dataset id with those splits) holding OpenAI-style ``messages``."""
    config = nemotron3_nano_30b()

    def chat(split: str) -> ChatSFTDataLoader.Config:
        return ChatSFTDataLoader.Config(
            dataset_path="./data/sft",
            split=split,
            # Nemotron's template empties the reasoning of assistant turns before
            # the last user message by default; with every turn trained, those turns
            # would teach "<think></think>". Keep the reasoning (or set
            # assistant_turns = "last" and leave the template's default).
            template=ChatTemplateConfig(truncate_history_thinking=False),
        )

    config.dataloader = chat("train")
    config.validator = Validator.Config(
        enable=True, freq=100, steps=10, dataloader=chat("validation")
    )
    config.optimizer = default_adamw(lr=5e-6)
    config.lr_scheduler = LRSchedulersContainer.Config(
        warmup_steps=50, decay_ratio=0.9, decay_type="cosine", min_lr_factor=0.1
    )
    config.checkpoint.initial_load_path = (
        "./assets/hf/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"
    )
    config.dump_folder = "./outputs/nano-30B-sft"
    return config


# --- LoRA (torchtitan_nemotron3/lora) ---------------------------------------------


def _lora_spec(flavor: str, rank: int, alpha: float, **kwargs):
    """``model_registry`` with TorchTitan's LoRA converter on NemotronH's default
    targets (Mamba in_proj parts and out_proj, attention q/k/v/o, dense MLP and
    shared expert up/down; see ``lora.converter.DEFAULT_TARGET_MODULES``)."""
    from .lora import NemotronHLoRAConverter

    return model_registry(
        flavor,
        converters=[NemotronHLoRAConverter.Config(rank=rank, alpha=alpha)],
        **kwargs,
    )


def nemotron3_debug_lora() -> NemotronHTrainer.Config:
    """``nemotron3_debug_sft`` with LoRA (rank 8, alpha 16): only the adapters train
    and are in the optimizer; the HF export of the last step is merged."""
    config = nemotron3_debug_sft()
    config.model_spec = _lora_spec("debugmodel", rank=8, alpha=16.0)
    config.optimizer = default_adamw(lr=1e-2, weight_decay=0.0)
    config.dump_folder = "./outputs/debug-lora"
    return config


def nemotron3_nano_30b_lora() -> NemotronHTrainer.Config:
    """LoRA SFT of Nemotron-3-Nano-30B-A3B (rank 32, alpha 64) on chat data, from
    the released HF checkpoint (base weights loaded, adapters at init: B = 0), in
    ``nemotron3_nano_30b_sft``'s layout and data; the base, routed experts and
    routing bias included, stays fixed. ``last_save_in_hf`` writes merged full
    weights (fp32, vLLM serves them); ``scripts/convert_checkpoint.py dcp-to-hf
    --adapters_only`` writes the adapters alone."""
    config = nemotron3_nano_30b_sft()
    config.model_spec = _lora_spec("nano-30B", rank=32, alpha=64.0)
    config.optimizer = default_adamw(lr=1e-4, weight_decay=0.0)
    config.dump_folder = "./outputs/nano-30B-lora"
    return config


# --- Low precision (torchtitan_nemotron3/low_precision) ---------------------------


def _with_low_precision(config: NemotronHTrainer.Config, **settings) -> NemotronHTrainer.Config:
    from .low_precision import LowPrecisionConfig

    config.low_precision = LowPrecisionConfig(**settings)
    config._apply_low_precision()
    return config


def nemotron3_debugmodel_mxfp8_emulated() -> NemotronHTrainer.Config:
    """``nemotron3_debugmodel`` with MXFP8 Linears and experts through torchao's
    emulated kernels: the B200 recipe's numerics on any CPU (slow)."""
    return _with_low_precision(
        nemotron3_debugmodel(), linear="mxfp8", experts="mxfp8", emulate=True
    )


def nemotron3_debugmodel_float8_emulated() -> NemotronHTrainer.Config:
    """``nemotron3_debugmodel`` with FP8 rowwise Linears (CPU ``_scaled_mm``) and
    emulated FP8 rowwise experts: the H100 recipe's numerics on any CPU."""
    return _with_low_precision(
        nemotron3_debugmodel(), linear="float8_rowwise", experts="float8_rowwise", emulate=True
    )


def nemotron3_nano_30b_mxfp8() -> NemotronHTrainer.Config:
    """``nemotron3_nano_30b`` with MXFP8 GEMMs (B200): 185 of 232 Linears and the
    routed experts; router gate, lm_head, Mamba's dt part stay exact."""
    return _with_low_precision(nemotron3_nano_30b(), linear="mxfp8", experts="mxfp8")


def nemotron3_nano_30b_float8() -> NemotronHTrainer.Config:
    """``nemotron3_nano_30b`` with FP8 rowwise GEMMs (H100), as ``_mxfp8``."""
    return _with_low_precision(
        nemotron3_nano_30b(), linear="float8_rowwise", experts="float8_rowwise"
    )
# --- QLoRA (torchtitan_nemotron3/qlora) -------------------------------------------


def nemotron3_debug_qlora() -> NemotronHTrainer.Config:
    """``nemotron3_debug_lora`` with the frozen base in NF4 (QLoRA): every frozen
    linear and the routed experts (lm_head too); no HF checkpoint, so the base is
    the seeded init (``debug.seed`` fixed: a resume re-derives the same base);
    checkpoints hold the adapters and their optimizer only."""
    config = nemotron3_debug_lora()
    config.model_spec = _lora_spec(
        "debugmodel", rank=8, alpha=16.0, base_dtype="nf4", nf4_lm_head=True
    )
    config.debug.seed = 0
    config.checkpoint.last_save_in_hf = False  # the adapters only (qlora/checkpoint.py)
    config.dump_folder = "./outputs/debug-qlora"
    return config


def nemotron3_nano_30b_qlora() -> NemotronHTrainer.Config:
    """QLoRA SFT of Nemotron-3-Nano-30B-A3B on one GPU (a 24 GB card): the frozen
    linears, routed experts and lm_head in NF4, read straight from the released
    HF checkpoint (``initial_load_path``, one layer's experts at a time); LoRA
    rank 16 on the default targets; seq 4096, full activation checkpointing;
    checkpoints hold the adapters and their optimizer only."""
    from torchtitan.distributed.activation_checkpoint import FullAC

    config = nemotron3_nano_30b_sft()
    config.model_spec = _lora_spec(
        "nano-30B", rank=16, alpha=32.0, base_dtype="nf4", nf4_lm_head=True
    )
    config.optimizer = default_adamw(lr=2e-4, weight_decay=0.0)
    config.parallelism.expert_parallel_degree = 1
    config.training.seq_len = 4096
    config.activation_checkpoint = FullAC.Config()
    config.checkpoint.last_save_in_hf = False
    config.dump_folder = "./outputs/nano-30B-qlora"
    return config
# --- DPO (torchtitan_nemotron3/dpo) -----------------------------------------------


def _dpo(config: NemotronHTrainer.Config, pairs_dir: str, **dpo) -> NemotronHTrainer.Config:
    """``config`` (a LoRA run) as DPO on the pairs in ``pairs_dir``: same model,
    tokenizer, layout and schedule; its data, validation and trainer replaced."""
    from .dpo import DPOConfig, DPOTrainer, DPOValidator, PreferenceDataLoader

    def pairs(split: str) -> PreferenceDataLoader.Config:
        return PreferenceDataLoader.Config(
            dataset_path=pairs_dir,
            split=split,
            template=ChatTemplateConfig(truncate_history_thinking=False),
        )

    fields = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(NemotronHTrainer.Config)
        if f.init
    }
    fields.update(
        dataloader=pairs("train"),
        validator=DPOValidator.Config(
            enable=True, freq=config.validator.freq, steps=4, dataloader=pairs("validation")
        ),
        dpo=DPOConfig(**dpo),
    )
    return DPOTrainer.Config(**fields)


def nemotron3_debug_dpo() -> NemotronHTrainer.Config:
    """DPO of the debug model with LoRA adapters (rank 8, alpha 16) on generated
    pairs (``dpo/assets.py``), offline: reference = adapters off, β = 0.1; the
    reward margin and held-out accuracy are logged every 5 steps."""
    from .dpo.assets import ensure_debug_dpo_assets

    tokenizer_dir, pairs_dir = ensure_debug_dpo_assets()
    config = nemotron3_debug_lora()
    config.hf_assets_path = tokenizer_dir
    config.training.steps = 20
    config.validator.freq = 5
    config.lr_scheduler = LRSchedulersContainer.Config(warmup_steps=2)
    config.dump_folder = "./outputs/debug-dpo"
    return _for_this_machine(_dpo(config, pairs_dir, beta=0.1))


def nemotron3_nano_30b_dpo() -> NemotronHTrainer.Config:
    """DPO of Nemotron-3-Nano-30B-A3B with LoRA (rank 32, alpha 64) in
    ``nemotron3_nano_30b_lora``'s layout, from the released HF checkpoint, on your
    preference pairs: ``dataset_path`` (default ``./data/dpo``, files ``train*`` and
    ``validation*`` with prompt/chosen/rejected). β = 0.1; the reference is the
    base (adapters off): from SFT adapters, merge them first or set
    ``dpo.reference = "precomputed"``."""
    config = nemotron3_nano_30b_lora()
    config.dump_folder = "./outputs/nano-30B-dpo"
    config.optimizer = default_adamw(lr=5e-6, weight_decay=0.0)
    return _dpo(config, "./data/dpo", beta=0.1)
