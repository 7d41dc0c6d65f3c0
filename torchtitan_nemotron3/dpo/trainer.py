"""DPO in TorchTitan's trainer: ``NemotronHTrainer`` with the DPO objective in place
of the token cross-entropy.

What changes, and why:

* the loss of a step is ``Σ_pairs L_pair / (pairs in the global batch)``: the pairs
  of every gradient-accumulation micro-batch and every data-parallel rank are
  counted before the first forward (one all-reduce, like TorchTitan's token count),
  so any split into ranks and micro-batches gives the same gradients;
* each micro-batch also runs the reference (``reference.py``): a no-grad forward
  with the adapters off, or a lookup in the table computed before the first update;
* the MoE routing stays as it is: router and correction bias frozen (LoRA freezes
  the base), no load-balancing update and no sequence balance loss;
* logged beside the loss: reward margin, accuracy, chosen and rejected rewards
  (``loss_metrics/dpo_*``); validation pairs give the same figures
  (``validate.py``).

Not supported (refused at config time): full-parameter DPO (the router must stay
frozen; train LoRA adapters), pipeline and context parallelism, MTP (set
``mtp_num_layers = 0``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torchtitan.components.loss import ChunkedLossWrapper
from torchtitan.tools.logging import logger

from ..lora.converter import adapted_fqns
from ..train.trainer import NemotronHTrainer
from .data import PAIR_KEY, SEGMENT_KEY, PreferenceDataLoader
from .loss import DPOTerms, dpo_terms, reply_logps, slot_values, token_logps
from .reference import ReferenceTable, adapters_off
from .validate import DPOValidator

METRICS = ("dpo_margin", "dpo_accuracy", "dpo_chosen_reward", "dpo_rejected_reward")


@dataclass(kw_only=True, slots=True)
class DPOConfig:
    beta: float = 0.1
    """β: the strength of the implicit KL penalty towards the reference."""

    nll_weight: float = 0.0
    """Weight of the chosen reply's per-token NLL added to each pair's loss (0: off)."""

    reference: Literal["adapters_off", "precomputed"] = "adapters_off"
    """"adapters_off": the model with its LoRA adapters switched off, one extra
    no-grad forward per micro-batch (right when the adapters start at zero).
    "precomputed": computed once before the first update and saved under
    ``<dump_folder>/dpo_reference/`` (right after SFT adapters, too)."""

    logp_chunk_len: int = 1024
    """Tokens per lm_head chunk when computing log-probabilities (never [B, L, V])."""

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"dpo.beta={self.beta}: must be > 0")
        if not self.nll_weight >= 0:
            raise ValueError(f"dpo.nll_weight={self.nll_weight}: must be >= 0")
        if self.logp_chunk_len < 1:
            raise ValueError(f"dpo.logp_chunk_len={self.logp_chunk_len}: must be >= 1")


def pairs_in(segment_BL: torch.Tensor) -> torch.Tensor:
    """Pairs in a batch: a row's replies are segments 0 .. 2K-1."""
    return ((segment_BL.max(dim=1).values + 1) // 2).sum()


class DPOTrainer(NemotronHTrainer):
    """``NemotronHTrainer`` optimising DPO on ``PreferenceDataLoader`` batches."""

    @dataclass(kw_only=True, slots=True)
    class Config(NemotronHTrainer.Config):
        dpo: DPOConfig = field(default_factory=DPOConfig)

        def __post_init__(self):
            NemotronHTrainer.Config.__post_init__(self)
            if not isinstance(self.dataloader, PreferenceDataLoader.Config):
                raise ValueError(
                    "DPO trains on preference pairs: dataloader must be "
                    f"PreferenceDataLoader.Config, got {type(self.dataloader).__name__}"
                )
            if self.validator.enable and not isinstance(self.validator, DPOValidator.Config):
                raise ValueError(
                    "DPO validation needs validator = DPOValidator.Config (pairs)"
                )
            p = self.parallelism
            for key in ("pipeline_parallel_degree", "context_parallel_degree"):
                if getattr(p, key) > 1:
                    raise ValueError(f"DPO: parallelism.{key} > 1 is not supported")
            if self.model_spec is None:
                return
            model = self.model_spec.model
            if not any(True for _ in adapted_fqns(model)):
                raise ValueError(
                    "DPO trains LoRA adapters (the router must stay frozen): add a "
                    "LoRA converter (e.g. the nemotron3_debug_dpo config function); "
                    "full-parameter DPO is not implemented"
                )
            if getattr(model, "mtp", None) is not None:
                raise ValueError("DPO with MTP is not supported: set mtp_num_layers = 0")
            # No balance loss and no routing-bias update during DPO.
            self.model_spec.post_optimizer_build_fn = None
            for layer in model.layers:
                if hasattr(layer.mixer, "seq_aux_loss_coeff"):
                    layer.mixer.seq_aux_loss_coeff = 0.0

    def __init__(self, config: Config):
        super().__init__(config)
        self.dpo = config.dpo
        chunked = isinstance(self.loss_fn, ChunkedLossWrapper)
        # With the chunked loss the model returns hidden states (TorchTitan sets
        # _skip_lm_head); else logits, and the "head" is the identity.
        self._head = self.loss_fn.lm_head if chunked else nn.Identity()
        self._global_pairs: torch.Tensor | None = None
        self._metric_sums: torch.Tensor | None = None
        self._tables: dict[str, ReferenceTable] = {}
        validator = getattr(self, "validator", None)
        if isinstance(validator, DPOValidator):
            validator.pair_terms = lambda d, lab: self.pair_terms(d, lab, "validation")
        if self._mtp_loss is None and not self._aux_moes:
            self._log_extra_losses()

    # --- one step ---------------------------------------------------------------

    def train_step(self, data_iterator) -> None:
        # Fetch the step's micro-batches first to count its pairs (TorchTitan does
        # the same for its token count), then hand them to the usual step.
        batches = [next(data_iterator) for _ in range(self.gradient_accumulation_steps)]
        local = sum(pairs_in(d[SEGMENT_KEY]) for d, _ in batches)
        self._global_pairs = self._sum_over_batch(local.double()).clamp(min=1)
        self._metric_sums = None
        if self.dpo.reference == "precomputed":
            self._ensure_tables()
        super().train_step(iter(batches))

    def _forward_backward_body(self, inputs, labels, global_valid_tokens, extra_kwargs):
        segment_BL = extra_kwargs.pop(SEGMENT_KEY)
        pair_BL = extra_kwargs.pop(PAIR_KEY)
        with self.train_context():
            terms = self._terms(inputs, labels, extra_kwargs, segment_BL, pair_BL, "train")
            loss = terms.loss.sum() / self._global_pairs
            loss.backward()
        sums = torch.stack(
            [t.sum() for t in (terms.margin, terms.accuracy, terms.chosen_reward, terms.rejected_reward)]
        ) / self._global_pairs
        self._metric_sums = sums if self._metric_sums is None else self._metric_sums + sums
        return loss.detach()

    def _terms(self, inputs, labels, extra, segment_BL, pair_BL, split) -> DPOTerms:
        model = self.model_parts[0]
        if self.dpo.reference == "adapters_off":
            with torch.no_grad(), adapters_off(model):
                reference_BP2, _ = self._reply_logps(model, inputs, labels, extra, segment_BL)
        else:
            reference_BP2 = self._tables[split].lookup(slot_values(pair_BL, segment_BL))
        policy_BP2, counts_BP2 = self._reply_logps(model, inputs, labels, extra, segment_BL)
        present_BP = counts_BP2[..., 0] > 0
        return dpo_terms(
            policy_BP2[present_BP],
            reference_BP2[present_BP],
            counts_BP2[present_BP][:, 0],
            beta=self.dpo.beta,
            nll_weight=self.dpo.nll_weight,
        )

    def _reply_logps(self, model, inputs, labels, extra, segment_BL):
        out = model(inputs, **extra)
        logp_BL = token_logps(out, self._head, labels, self.dpo.logp_chunk_len)
        return reply_logps(logp_BL, segment_BL)

    def pair_terms(self, input_dict, labels, split: str) -> DPOTerms:
        """A batch's per-pair terms without gradients (validation)."""
        input_dict = dict(input_dict)
        segment_BL, pair_BL = input_dict.pop(SEGMENT_KEY), input_dict.pop(PAIR_KEY)
        extra = {k: v for k, v in input_dict.items() if k != "input"}
        with torch.no_grad():
            return self._terms(input_dict["input"], labels, extra, segment_BL, pair_BL, split)

    def _extra_loss_terms(self) -> dict[str, float]:
        terms = super()._extra_loss_terms()
        if self._metric_sums is not None:
            values = self._metric_sums.to(self.device)
            if self.parallel_dims.dp_enabled:
                dist.all_reduce(values, group=self.parallel_dims.get_mesh("batch").get_group())
            terms.update(zip(METRICS, values.tolist(), strict=True))
            self._metric_sums = None
        return terms

    # --- the precomputed reference ----------------------------------------------

    def _splits(self) -> dict[str, PreferenceDataLoader.Config]:
        splits = {"train": self.config.dataloader}
        if self.config.validator.enable:
            splits["validation"] = self.config.validator.dataloader
        return splits

    def _fingerprint(self, dl: PreferenceDataLoader.Config) -> str:
        what = {
            "data": [dl.dataset_path, dl.dataset_name, dl.split, dl.overflow],
            "columns": repr(dl.columns),
            "template": repr(dl.template),
            "seq_len": self.config.training.seq_len,
            "tokenizer": str(self.config.hf_assets_path),
        }
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def _ensure_tables(self) -> None:
        """Load each split's table, or compute it now: only before the first update
        (the reference is the starting policy)."""
        for split, dl in self._splits().items():
            if split in self._tables:
                continue
            path = os.path.join(self.config.dump_folder, "dpo_reference", f"{split}.safetensors")
            fingerprint = self._fingerprint(dl)
            if os.path.exists(path):
                self._tables[split] = ReferenceTable.load(path, fingerprint)
                continue
            if self.step != 1:
                raise RuntimeError(
                    f"{path}: missing at step {self.step}; the precomputed DPO reference "
                    "must come from the starting weights (restart from step 0, or use "
                    'dpo.reference = "adapters_off")'
                )
            self._tables[split] = self._compute_table(dl, fingerprint)
            if not dist.is_initialized() or dist.get_rank() == 0:
                self._tables[split].save(path)
                logger.info(f"[dpo] reference log-probs of {split}: {path}")
            if dist.is_initialized():
                dist.barrier()

    def _compute_table(self, dl: PreferenceDataLoader.Config, fingerprint: str) -> ReferenceTable:
        degree, rank = 1, 0
        if self.parallel_dims.dp_enabled:
            batch_mesh = self.parallel_dims.get_mesh("batch")
            degree, rank = batch_mesh.size(), batch_mesh.get_local_rank()
        loader = replace(dl, infinite=False).build(
            dp_world_size=degree,
            dp_rank=rank,
            tokenizer=self.tokenizer,
            seq_len=self.config.training.seq_len,
            local_batch_size=self.config.training.local_batch_size,
        )
        source = loader.dataset.source
        if source.stream is not None:
            raise ValueError(
                f'dpo.reference = "precomputed" needs local files ({dl.dataset_path} is '
                "streamed from the hub: download it, or use adapters_off)"
            )
        table_N2 = torch.zeros(source.num_rows, 2, dtype=torch.float32, device=self.device)
        model = self.model_parts[0]
        with torch.no_grad():
            for input_dict, labels in loader:
                input_dict = {k: v.to(self.device) for k, v in input_dict.items()}
                segment_BL, pair_BL = input_dict.pop(SEGMENT_KEY), input_dict.pop(PAIR_KEY)
                extra = {"positions": input_dict["positions"]}
                logps_BP2, counts_BP2 = self._reply_logps(
                    model, input_dict["input"], labels.to(self.device), extra, segment_BL
                )
                pairs_BP = slot_values(pair_BL, segment_BL)[..., 0]
                present_BP = counts_BP2[..., 0] > 0
                table_N2[pairs_BP[present_BP]] = logps_BP2[present_BP].float()
        if self.parallel_dims.dp_enabled:  # each pair was scored by one rank
            dist.all_reduce(table_N2, group=self.parallel_dims.get_mesh("batch").get_group())
        return ReferenceTable(table_N2.cpu(), fingerprint)
