"""The trainer's loss with multi-token prediction: ``L_main + λ/D · Σ_k CE_k``.

Wraps the run's own loss (``CrossEntropyLoss``, or ``ChunkedLossWrapper`` whose
per-chunk backward ignores any scale applied to its result) and calls it once per
output of ``NemotronHModel.forward`` with MTP on. TorchTitan's losses return
``sum / global_valid_tokens``; depth k is called with its own global count scaled
by ``D / λ``, so it returns ``λ/D · CE_k`` with CE_k the mean over depth k's own
valid tokens across every rank and microbatch of the step — the weighting is in
the denominator, where the chunked backward sees it too.

The trainer counts each depth's valid tokens while the step's batches are fetched
(``start_step``, then ``count_batch`` per batch; summed over the batch mesh at the
step's first loss call); the terms of the step's calls are kept, unscaled, for
logging (``pop_terms``). Validation scores the main output only (``main_only``).

Under pipeline parallelism the schedule calls the loss on the last stage with the
target alone (no ``positions``): the trainer passes each depth's labels, shifted
within documents, stacked as ``[B, 1 + D, L]`` (``stack_labels``), and
``pipeline_loss`` takes the validator's plain ``[B, L]`` labels as main-only.
"""

import torch
from torchtitan.components.loss import IGNORE_INDEX, BaseLoss

from ..model.model import seq_idx_from_positions
from ..model.mtp import mtp_labels


class MTPLoss:
    """``loss_fn(pred, labels, global_valid_tokens, positions=...)`` for a model
    that returns ``[main, depth 1, ..., depth D]`` (logits, or hidden states
    under the chunked loss)."""

    def __init__(self, inner: BaseLoss, num_depths: int, scale: float):
        if num_depths <= 0:
            raise ValueError(f"num_depths={num_depths}: MTPLoss needs MTP depths")
        if scale < 0:
            raise ValueError(f"mtp_loss_scaling_factor={scale}: must be >= 0")
        self.inner = inner
        self.num_depths = num_depths
        self.scale = scale
        self._local_counts = torch.zeros(num_depths, dtype=torch.int64)
        self._global_counts: torch.Tensor | None = None
        self._reduce = None
        self._terms: dict[str, torch.Tensor] = {}
        self._main_sum: torch.Tensor | None = None  # main terms since pop_main

    # --- per-step token counts -------------------------------------------------

    def count_batch(self, labels_BL: torch.Tensor, positions_BL: torch.Tensor | None):
        """Add one fetched batch's valid tokens per depth (before any forward)."""
        for k, labels_k in enumerate(self._depth_labels(labels_BL, positions_BL)[1:]):
            self._local_counts[k] += (labels_k != IGNORE_INDEX).sum().cpu()

    def start_step(self, reduce) -> None:
        """A training step begins: its batches are counted as they are fetched
        and, at the first loss call, summed by ``reduce`` (over the batch mesh)."""
        self._local_counts = torch.zeros_like(self._local_counts)
        self._global_counts = None
        self._reduce = reduce
        self._terms = {}

    def _step_counts(self) -> torch.Tensor | None:
        if self._global_counts is None and self._reduce is not None:
            self._global_counts = self._reduce(self._local_counts)
        return self._global_counts

    def forget_calls(self) -> None:
        """Drop the terms of the calls so far (PyTorch's pipeline shape-inference
        pass calls the loss once before the first step's microbatches)."""
        self._main_sum, self._terms = None, {}

    def pop_main(self) -> torch.Tensor | None:
        """Sum of the main terms of the calls since the last ``pop_main``: what one
        forward-backward call (all its pipeline microbatches) adds to the loss."""
        main, self._main_sum = self._main_sum, None
        return main

    def pop_terms(self) -> dict[str, torch.Tensor]:
        """Sum over this step's calls of each term (main, mtp_k), unscaled: the
        trainer's global means after summing over ranks."""
        terms, self._terms = self._terms, {}
        return terms

    # --- the loss ----------------------------------------------------------------

    def _add_term(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self._terms[name] = self._terms[name] + value if name in self._terms else value

    def stack_labels(
        self, labels_BL: torch.Tensor, positions_BL: torch.Tensor | None
    ) -> torch.Tensor:
        """``[B, 1 + D, L]``: the main labels, then depth k's (shifted by k
        within each document), for a loss call that gets no ``positions``."""
        return torch.stack(self._depth_labels(labels_BL, positions_BL), dim=1)

    def _depth_labels(
        self, labels: torch.Tensor, positions_BL: torch.Tensor | None
    ) -> list[torch.Tensor]:
        if labels.dim() == 3:  # stack_labels' output
            if labels.shape[1] != self.num_depths + 1:
                raise ValueError(
                    f"MTPLoss: stacked labels {tuple(labels.shape)} for "
                    f"{self.num_depths} MTP depths (expected [B, {self.num_depths + 1}, L])"
                )
            return list(labels.unbind(1))
        seq_idx_BL = None if positions_BL is None else seq_idx_from_positions(positions_BL)
        return [labels] + [
            mtp_labels(labels, k, seq_idx_BL) for k in range(1, self.num_depths + 1)
        ]

    def __call__(
        self,
        pred: list[torch.Tensor],
        labels: torch.Tensor,
        global_valid_tokens: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``labels``: [B, L] with ``positions`` (the documents), or
        ``stack_labels``' [B, 1 + D, L]."""
        if not isinstance(pred, (list, tuple)) or len(pred) != self.num_depths + 1:
            raise ValueError(
                f"MTPLoss expects [main, {self.num_depths} MTP depths] from the model, "
                f"got {type(pred).__name__} of length {len(pred)}"
            )
        labels_per_depth = self._depth_labels(labels, positions)
        main, metrics = self.inner(
            pred[0], labels_per_depth[0], global_valid_tokens, **kwargs
        )
        self._add_term("main", main)
        main_value = main.detach()
        self._main_sum = main_value if self._main_sum is None else self._main_sum + main_value
        total = main
        for k in range(1, self.num_depths + 1):
            labels_k = labels_per_depth[k]
            counts = self._step_counts()
            if counts is not None:
                count = counts[k - 1]
            else:  # outside a training step (e.g. a test): this batch alone
                count = (labels_k != IGNORE_INDEX).sum()
            count = count.clamp_min(1).to(torch.float32)
            if self.scale > 0:
                # λ/D · sum / count, the weight in the denominator (see above)
                weighted, _ = self.inner(
                    pred[k], labels_k, count * (self.num_depths / self.scale), **kwargs
                )
                total = total + weighted
                self._add_term(f"mtp_{k}", weighted * (self.num_depths / self.scale))
            else:  # λ = 0: logged, not trained
                value, _ = self.inner(pred[k].detach(), labels_k, count, **kwargs)
                self._add_term(f"mtp_{k}", value)
        return total, metrics

    def pipeline_loss(
        self, pred: list[torch.Tensor], target: torch.Tensor, **kwargs
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The pipeline schedule's loss: training passes ``stack_labels``' target
        (the full MTP loss), validation plain labels (the main output only)."""
        if target.dim() == 3:
            return self(pred, target, **kwargs)
        return self.main_only(pred, target, **kwargs)

    def main_only(
        self,
        pred: list[torch.Tensor],
        labels_BL: torch.Tensor,
        global_valid_tokens: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The run's own loss on the main output (validation)."""
        kwargs.pop("positions", None)
        return self.inner(pred[0], labels_BL, global_valid_tokens, **kwargs)
