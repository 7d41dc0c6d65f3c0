"""Held-out preference pairs, scored every ``freq`` steps on the same pairs: DPO
loss, reward margin and accuracy (the share of pairs whose chosen reply the policy
now prefers, relative to the reference, over the rejected one).

TorchTitan's ``Validator`` averages a token loss; DPO's figures are per pair, so
this validator sums each figure over the pairs of every rank and divides by their
count. The trainer lends it ``pair_terms`` (the objective it trains with).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torchtitan.components.validate import BaseValidator, Validator
from torchtitan.tools.logging import logger

from .data import PreferenceDataLoader


class DPOValidator(BaseValidator):
    # A ``Validator.Config`` so that the trainer config's ``validator`` field (and
    # its ``--validator.*`` flags) take it.
    @dataclass(kw_only=True, slots=True)
    class Config(Validator.Config):
        steps: int = 2
        """Batches per validation (> 0: every rank takes the same number)."""

        dataloader: PreferenceDataLoader.Config = field(
            default_factory=lambda: PreferenceDataLoader.Config(split="validation")
        )

        def __post_init__(self):
            if self.steps < 1:
                raise ValueError(f"validator.steps={self.steps}: must be >= 1")

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int,
        dp_rank: int,
        tokenizer,
        parallel_dims,
        metrics_processor,
        seq_len: int,
        local_batch_size: int,
        **kwargs,
    ):
        super().__init__(config)
        # Looping: every rank takes ``steps`` batches even when its share is small.
        self.dl_config = replace(config.dataloader, infinite=True)
        self.dp_world_size, self.dp_rank = dp_world_size, dp_rank
        self.tokenizer, self.parallel_dims = tokenizer, parallel_dims
        self.metrics_processor = metrics_processor
        self.seq_len, self.local_batch_size = seq_len, local_batch_size
        self.pair_terms = None  # set by DPOTrainer

    def validate(self, model_parts, step: int) -> None:
        loader = self.dl_config.build(
            dp_world_size=self.dp_world_size,
            dp_rank=self.dp_rank,
            tokenizer=self.tokenizer,
            seq_len=self.seq_len,
            local_batch_size=self.local_batch_size,
        )
        device = next(model_parts[0].parameters()).device
        sums = torch.zeros(5, dtype=torch.float64, device=device)
        for model in model_parts:
            model.eval()
        batches = iter(loader)
        for _ in range(self.config.steps):
            input_dict, labels = next(batches)
            input_dict = {k: v.to(device) for k, v in input_dict.items()}
            terms = self.pair_terms(input_dict, labels.to(device))
            sums += torch.stack(
                [
                    terms.loss.sum(),
                    terms.margin.sum(),
                    terms.accuracy.sum(),
                    terms.chosen_reward.sum(),
                    torch.tensor(float(terms.loss.numel()), device=device),
                ]
            ).double()
        for model in model_parts:
            model.train()
        if self.parallel_dims.dp_enabled:
            dist.all_reduce(sums, group=self.parallel_dims.get_mesh("batch").get_group())
        loss, margin, accuracy, chosen, n = (sums[:4] / sums[4].clamp(min=1)).tolist() + [
            int(sums[4])
        ]
        logger.info(
            f"[dpo] validation step {step}: {n} pairs, loss {loss:.5f}, margin "
            f"{margin:.5f}, accuracy {accuracy:.4f}, chosen reward {chosen:.5f}"
        )
        self.metrics_processor.log_validation(
            loss=loss,
            step=step,
            extra_metrics={
                "validation_metrics/dpo_margin": margin,
                "validation_metrics/dpo_accuracy": accuracy,
                "validation_metrics/dpo_chosen_reward": chosen,
                "validation_metrics/dpo_pairs": n,
            },
        )
