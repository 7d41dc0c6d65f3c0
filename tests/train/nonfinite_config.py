"""Test-only: the NemotronH debug run with NaN/inf injected at chosen steps.

``torchrun -m torchtitan.train --module tests.train.nonfinite_config --config
nemotron3_debug_nonfinite [--inject.loss_steps 3] [--inject.grad_steps 4]
[--nonfinite.action skip]`` (repo root on ``PYTHONPATH``). The injection is a
test-only subclass of the real :class:`NemotronHTrainer` (a NaN added to the loss
function's result, an inf written into a gradient after the backward), so the
guard under test runs unchanged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from torchtitan_nemotron3.config_registry import nemotron3_debugmodel
from torchtitan_nemotron3.train.trainer import NemotronHTrainer


@dataclass(kw_only=True, slots=True)
class InjectConfig:
    loss_steps: list[int] = field(default_factory=list)
    """Steps whose loss becomes NaN (its gradients stay finite)."""

    grad_steps: list[int] = field(default_factory=list)
    """Steps where one gradient element becomes inf (the loss stays finite)."""

    spike_steps: list[int] = field(default_factory=list)
    """Steps whose loss (and so its gradients) is multiplied by 100: a spike."""

    rank: int = -1
    """Only this rank injects (-1: every rank)."""


class NaNInjectingTrainer(NemotronHTrainer):
    @dataclass(kw_only=True, slots=True)
    class Config(NemotronHTrainer.Config):
        inject: InjectConfig = field(default_factory=InjectConfig)

    def __init__(self, config):
        super().__init__(config)
        loss_fn = self.loss_fn

        def loss_fn_with_nan(*args, **kwargs):
            # + NaN: the loss is NaN, its gradients stay finite (d(l + c)/dl = 1).
            loss, extra = loss_fn(*args, **kwargs)
            if self._injects() and self.step in self.config.inject.loss_steps:
                loss = loss + float("nan")
            if self._injects() and self.step in self.config.inject.spike_steps:
                loss = loss * 100.0
            return loss, extra

        self.loss_fn = loss_fn_with_nan
        self._record_expert_counts()

    # What the MoE routing-bias update sees: rank 0 appends one JSON line per
    # event to ``<dump_folder>/expert_counts.jsonl``: each layer's
    # ``tokens_per_expert_E`` right before the update (an optimizer step pre-hook
    # run just after the non-finite check, so only on steps that update) and right
    # after ``train_step`` returns (skipped or not).
    def _moes(self):
        moes = {}  # by identity: activation checkpointing wraps each block
        for model_part in self.model_parts:
            for name, module in model_part.named_modules():
                if getattr(module, "moe_enabled", False):
                    moes.setdefault(id(module.moe), (name, module.moe))
        return list(moes.values())

    def _write_counts(self, event: str) -> None:
        if dist.get_rank() != 0:
            return
        counts = {}
        for name, moe in self._moes():
            t = moe.tokens_per_expert_E
            counts[name] = (t.to_local() if isinstance(t, DTensor) else t).tolist()
        path = os.path.join(self.config.dump_folder, "expert_counts.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps({"step": self.step, "event": event, "counts": counts}))
            f.write("\n")

    def _record_expert_counts(self) -> None:
        hooks = self.optimizers._optimizer_step_pre_hooks
        # NemotronHTrainer's non-finite check (other hooks, e.g. the routing
        # metrics' capture, may be ahead of it)
        check_id = next(k for k, h in hooks.items() if h == self._check_update)
        handle = self.optimizers.register_step_pre_hook(
            lambda *_: self._write_counts("update")
        )
        hooks.move_to_end(handle.id, last=False)
        hooks.move_to_end(check_id, last=False)

    def train_step(self, data_iterator) -> None:
        super().train_step(data_iterator)
        self._write_counts("after_step")

    def _injects(self) -> bool:
        rank = self.config.inject.rank
        return rank < 0 or dist.get_rank() == rank

    def forward_backward_step(self, **kwargs) -> torch.Tensor:
        loss = super().forward_backward_step(**kwargs)
        if self._injects() and self.step in self.config.inject.grad_steps:
            with torch.no_grad():
                for model_part in self.model_parts:
                    for p in model_part.parameters():
                        grad = p.grad
                        if isinstance(grad, DTensor):
                            grad = grad.to_local()
                        if grad is not None and grad.numel() > 0:
                            grad.view(-1)[0] = float("inf")
                            break
        return loss


def nemotron3_debug_nonfinite() -> NaNInjectingTrainer.Config:
    """``nemotron3_debugmodel`` shrunk to a few fast steps, fp32, a checkpoint
    (with optimizer state) after every step, nothing injected by default."""
    base = nemotron3_debugmodel()
    config = NaNInjectingTrainer.Config(
        **{f.name: getattr(base, f.name) for f in fields(base)}
    )
    config.training.local_batch_size = 2
    config.training.seq_len = 64
    config.training.steps = 4
    config.training.mixed_precision_param = "float32"
    config.metrics.log_freq = 1
    config.checkpoint.enable = True
    config.checkpoint.interval = 1
    config.checkpoint.keep_latest_k = 0
    config.checkpoint.last_save_model_only = False
    config.debug.seed = 0
    return config
