"""NemotronH's Trainer: TorchTitan 0.3.0's ``Trainer`` plus a non-finite step guard
and a complete HF export.

``checkpoint.last_save_in_hf`` makes TorchTitan write the last step as safetensors
only; ``NemotronHTrainer`` then adds ``config.json`` and, from ``hf_assets_path``,
the tokenizer files, chat template and ``generation_config.json``, so the folder
loads with ``AutoModelForCausalLM`` and ``AutoTokenizer`` as it is.

A NaN or infinite loss or gradient norm must never reach the weights, hence never a
checkpoint. TorchTitan 0.3.0 raises on a non-finite loss only on *logging* steps and
only *after* ``optimizers.step()`` (the weights are NaN by then), and never looks at
the gradients. ``NemotronHTrainer`` checks both on every step, in an optimizer step
pre-hook (after backward and gradient clipping, before any update and before the
MoE routing-bias update), then does what the job file's ``[nonfinite]`` asks:

* ``action = "stop"`` (default): raise ``NonFiniteError`` naming the step and what
  was non-finite. The train loop saves a step's checkpoint only after
  ``train_step`` returns, so the last checkpoint is the previous, finite step's.
* ``action = "skip"``: drop the step's update: no optimizer step (weights, Adam
  moments and step count unchanged), no routing-bias update (the step's expert
  load counts are discarded). The step still counts: ``step``, the LR schedule and
  the data position advance, so ``training.steps``, warmup and
  ``checkpoint.interval`` keep meaning train steps. Each skip is a warning with
  the running count; ``max_consecutive_skips`` skips in a row stop the run anyway.

Why a gradient check stands for the gradient norm: TorchTitan clips with a global
norm, so a NaN norm turns every gradient NaN and an infinite one turns the
infinite elements NaN; a finite norm leaves all gradients finite. Every rank
decides the same: the flags are all-reduced (MAX), one small all-reduce and one
device-to-host copy per step.
"""

import os
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torchtitan.tools.logging import logger
from torchtitan.trainer import Trainer

from ..hf.config import args_from_model_config
from ..hf.dcp_convert import add_hf_config


@dataclass(kw_only=True, slots=True)
class NonFiniteConfig:
    """What to do when a step's loss or gradient norm is NaN or infinite."""

    action: Literal["stop", "skip"] = "stop"
    """"stop": end the run with an error before the step's update and checkpoint.
    "skip": drop the step's update and continue."""

    max_consecutive_skips: int = 10
    """With "skip": stop anyway after this many skipped steps in a row (0: never)."""

    def __post_init__(self):
        if self.max_consecutive_skips < 0:
            raise ValueError(
                f"nonfinite.max_consecutive_skips={self.max_consecutive_skips}: "
                "must be >= 0"
            )


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm was not finite; nothing of the step was applied."""


class _SkipUpdate(Exception):
    """Raised by the step pre-hook to leave ``optimizers.step()`` before any update."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class NemotronHTrainer(Trainer):
    """TorchTitan's ``Trainer`` with the non-finite step guard of this module."""

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        nonfinite: NonFiniteConfig = field(default_factory=NonFiniteConfig)
        kernel_backend: Literal["auto", "torch", "cuda"] | None = None
        """The Mamba2 ops of every ``M`` layer, as ``model_registry(kernel_backend=)``:
        "auto" (GPU kernels where installed and the tensors are on CUDA, else torch),
        "torch", "cuda"; None keeps what the config function chose."""

        def __post_init__(self):
            Trainer.Config.__post_init__(self)  # (no super() in slots dataclasses)
            if self.kernel_backend is not None and self.model_spec is not None:
                for layer in self.model_spec.model.layers:
                    if hasattr(layer.mixer, "kernel_backend"):
                        layer.mixer.kernel_backend = self.kernel_backend

    def __init__(self, config: Config):
        super().__init__(config)
        self.skipped_steps = 0  # by this process; not checkpointed
        self.consecutive_skips = 0
        self._loss_is_finite: torch.Tensor | None = None
        handle = self.optimizers.register_step_pre_hook(self._check_update)
        # Before TorchTitan's MoE load-balancing hook: a refused step must not move
        # the routing bias either.
        self.optimizers._optimizer_step_pre_hooks.move_to_end(handle.id, last=False)

    def train(self) -> None:
        super().train()
        checkpoint = self.config.checkpoint
        if checkpoint.enable and checkpoint.last_save_in_hf:
            if not dist.is_initialized() or dist.get_rank() == 0:
                self._complete_hf_export(checkpoint)
            if dist.is_initialized():
                dist.barrier()

    def _complete_hf_export(self, checkpoint) -> None:
        export_dir = os.path.join(self.checkpointer.folder, f"step-{self.step}")
        if not os.path.isdir(export_dir) or os.path.exists(
            os.path.join(export_dir, "config.json")
        ):
            return
        assets = self.config.hf_assets_path
        config_path = add_hf_config(
            export_dir,
            args_from_model_config(self.config.model_spec.model),
            dtype=checkpoint.export_dtype,
            assets_dir=assets if assets and os.path.isdir(assets) else None,
        )
        logger.info(f"HF export complete: {config_path} (+ tokenizer files if any)")

    def forward_backward_step(self, **kwargs) -> torch.Tensor:
        loss = super().forward_backward_step(**kwargs)
        finite = torch.isfinite(_local(loss.detach())).all()
        self._loss_is_finite = finite & self._loss_is_finite
        return loss

    def train_step(self, data_iterator) -> None:
        self._loss_is_finite = torch.ones((), dtype=torch.bool, device=self.device)
        try:
            super().train_step(data_iterator)
        except _SkipUpdate:
            self.optimizers.zero_grad()
            for model_part in self.model_parts:
                for module in model_part.modules():
                    if getattr(module, "moe_enabled", False):
                        module.moe.tokens_per_expert_E.zero_()
            self.lr_schedulers.step()
        else:
            self.consecutive_skips = 0

    def _check_update(self, *_) -> None:
        grads = [
            _local(p.grad)
            for model_part in self.model_parts
            for p in model_part.parameters()
            if p.grad is not None
        ]
        grads_finite = torch.ones((), dtype=torch.bool, device=self.device)
        if grads:
            grads_finite = torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
        bad = torch.stack([~self._loss_is_finite, ~grads_finite]).int()
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        loss_bad, grad_bad = bad.tolist()
        if not (loss_bad or grad_bad):
            return
        what = "loss" if loss_bad else "gradient norm"
        how = self.config.nonfinite
        self.consecutive_skips += 1
        if how.action == "stop":
            raise NonFiniteError(
                f"non-finite {what} at step {self.step}: stopped before the optimizer "
                f"step, so no weights were updated and no checkpoint of step "
                f"{self.step} was written. To skip such steps instead, set "
                '[nonfinite] action = "skip" (--nonfinite.action skip).'
            )
        if how.max_consecutive_skips and self.consecutive_skips >= how.max_consecutive_skips:
            raise NonFiniteError(
                f"non-finite {what} at step {self.step}, {self.consecutive_skips} "
                "skipped steps in a row (nonfinite.max_consecutive_skips="
                f"{how.max_consecutive_skips}): the run has diverged; stopping."
            )
        self.skipped_steps += 1
        logger.warning(
            f"Non-finite {what} at step {self.step}: skipped the update (weights and "
            f"optimizer state unchanged). Skipped steps so far: {self.skipped_steps}."
        )
        raise _SkipUpdate
