"""Test-only base config: TorchTitan's qwen3 debug model, shrunk for 2 CPU cores.

The training infrastructure (TOML loader, entry point, CPU shims, harness) is
model-agnostic; this config lets its tests run before, and independently of, the
NemotronH model. Referenced from TOML files as
``[job] module = "tests.train.qwen3_debug_config"``.
"""

from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
from torchtitan.config import TrainingConfig
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
from torchtitan.models import qwen3
from torchtitan.models.common.attention import (
    FlexAttention,
    ScaledDotProductAttention,
)
from torchtitan.trainer import Trainer


def qwen3_tiny() -> Trainer.Config:
    """2-layer qwen3 debug model, seq 128, batch 4.

    Tokenizer and data come from the TOML (``[job] debug_assets = true``), which
    points this HuggingFaceTextDataLoader at the generated offline corpus.

    FlexAttention has no CPU backward, so its inner attention is swapped for SDPA
    (causal over the packed sequence; fine for an infrastructure test).
    """
    model_spec = qwen3.model_registry("debugmodel")
    model = model_spec.model
    model.layers = model.layers[:2]
    for _, _, parent, attr in list(model.traverse(FlexAttention.Config)):
        setattr(parent, attr, ScaledDotProductAttention.Config())
    config = Trainer.Config(
        model_spec=model_spec,
        loss=CrossEntropyLoss.Config(global_vocab_size=model.vocab_size),
        metrics=MetricsProcessor.Config(log_freq=1),
        dataloader=HuggingFaceTextDataLoader.Config(),
        optimizer=default_adamw(lr=3e-3),
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=2),
        training=TrainingConfig(local_batch_size=4, seq_len=128, steps=10),
    )
    return config
