"""What a MoE trainer watches: per-layer routing figures in TorchTitan's metrics.

Every logging step (``metrics.log_freq``), for each MoE layer (``layers.<i>``, and
the MTP block's as ``mtp.<i>``), from the counts the router already keeps
(``tokens_per_expert_E``: the step's routed tokens per expert, all microbatches):

* ``routing/<layer>/imbalance``: max / mean tokens per expert (1.0: balanced);
* ``routing/<layer>/empty_experts``: experts that got no token;
* ``routing/<layer>/bias_norm``, ``bias_min``, ``bias_max``: the aux-loss-free
  correction bias (``expert_bias_E``, as this step's routing used it);
* ``routing/<layer>/ep_imbalance`` under expert parallelism: max / mean tokens
  received per EP rank (its contiguous slice of experts; summed over the
  data-parallel copies of that rank);
* ``routing/imbalance_max``, ``routing/empty_experts``: the worst layer, the total;

and every ``heatmap_freq`` steps (on a logging step) a TensorBoard image
``routing/load``: one row per MoE layer, one column per expert, colour
log2(tokens / layer mean) from blue (-2: a quarter of the mean or less) through
white (balanced) to red (+2: four times the mean or more); black: no token.

Why here and how: TorchTitan's load-balancing hook (an optimizer step pre-hook)
sums the counts over ranks and zeroes them, so the counts are read in a pre-hook
that runs first. On a logging step it sums them over the same ranks and reduces
them to a few figures per layer *on the device*; the figures are copied to the
host inside ``MetricsProcessor.log``, with the loss and grad norm TorchTitan reads
there anyway: no extra device-host sync on the training path. Under pipeline
parallelism each stage holds its own layers; their figures are gathered to the
logging rank at log time. Without the load-balancing hook (LoRA keeps the routing
fixed) nothing zeroes the counts, so a post-hook does, keeping them per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

_PER_LAYER = ("imbalance", "empty_experts", "bias_norm", "bias_min", "bias_max")


@dataclass(kw_only=True, slots=True)
class RoutingMetricsConfig:
    """Routing figures of every MoE layer in TorchTitan's metrics (TensorBoard/W&B)."""

    enable: bool = True
    """Log the per-layer figures every ``metrics.log_freq`` steps."""

    heatmap_freq: int = 100
    """Steps between two layer × expert load images in TensorBoard (taken on a
    logging step that is a multiple of it); 0: none."""

    def __post_init__(self):
        if self.heatmap_freq < 0:
            raise ValueError(
                f"routing_metrics.heatmap_freq={self.heatmap_freq}: must be >= 0"
            )


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def moe_layers(model_parts) -> list[tuple[str, object, object]]:
    """``(name, block, moe)`` of every MoE layer this rank holds, in layer order."""
    found = []
    for part in model_parts:
        groups = [("", part.get_submodule("layers"))]
        mtp = getattr(part, "mtp", None)
        if mtp is not None:
            groups.append(("mtp.", mtp.layers))
        for prefix, layers in groups:
            for key, block in layers.items():
                if getattr(block, "moe_enabled", False):
                    found.append((f"{prefix}{key}", block, block.moe))
    return found


def layer_stats(counts_LE: torch.Tensor, bias_LE: torch.Tensor | None, ep: int = 1):
    """``[L, 5 (+1 with ep > 1)]`` on the device: imbalance, empty experts, bias
    norm / min / max (NaN without a bias) and, with ``ep`` > 1, the EP imbalance.
    ``counts_LE``: tokens per expert; ``bias_LE``: the correction bias."""
    counts_LE = counts_LE.float()
    mean_L = counts_LE.mean(-1)
    cols = [counts_LE.amax(-1) / mean_L, (counts_LE == 0).sum(-1).float()]
    if bias_LE is None:
        cols += [torch.full_like(mean_L, float("nan"))] * 3
    else:
        bias_LE = bias_LE.float()
        cols += [bias_LE.norm(dim=-1), bias_LE.amin(-1), bias_LE.amax(-1)]
    if ep > 1:
        L, E = counts_LE.shape
        per_rank_LR = counts_LE.reshape(L, ep, E // ep).sum(-1)
        cols.append(per_rank_LR.amax(-1) / per_rank_LR.mean(-1))
    return torch.stack(cols, dim=-1)


def heatmap_image(counts_LE: torch.Tensor, cell: int = 8) -> torch.Tensor:
    """``[L·cell, E·cell, 3]`` uint8: log2(count / layer mean) clipped to [-2, 2],
    blue → white → red; black where an expert got no token."""
    counts_LE = counts_LE.float().cpu()
    x_LE = torch.log2(counts_LE / counts_LE.mean(-1, keepdim=True)).clamp(-2, 2) / 2
    over, under = x_LE.clamp(min=0), (-x_LE).clamp(min=0)
    rgb_LE3 = torch.stack([1 - under, 1 - over - under, 1 - over], dim=-1)
    rgb_LE3[counts_LE == 0] = 0.0
    img = (rgb_LE3 * 255).round().to(torch.uint8)
    return img.repeat_interleave(cell, 0).repeat_interleave(cell, 1)


class RoutingMetrics:
    """Wires the figures into a ``NemotronHTrainer`` (see the module docstring)."""

    def __init__(self, trainer, config: RoutingMetricsConfig):
        self.trainer = trainer
        self.config = config
        self.layers = moe_layers(trainer.model_parts)
        pd = trainer.parallel_dims
        self.ep = pd.ep if pd.ep_enabled else 1
        self._captured: tuple[int, torch.Tensor, torch.Tensor | None] | None = None
        opt = trainer.optimizers
        handle = opt.register_step_pre_hook(lambda *_: self._capture())
        # Before TorchTitan's load-balancing hook, which zeroes the counts.
        opt._optimizer_step_pre_hooks.move_to_end(handle.id, last=False)
        opt.register_step_post_hook(lambda *_: self._zero_counts())
        log = trainer.metrics_processor.log

        def log_with_routing(step, *args, extra_metrics=None, **kwargs):
            extra = dict(extra_metrics or {})
            extra.update(self.metrics(step))
            return log(step, *args, extra_metrics=extra, **kwargs)

        trainer.metrics_processor.log = log_with_routing

    @classmethod
    def attach(cls, trainer, config: RoutingMetricsConfig) -> RoutingMetrics | None:
        """Wire the figures in when enabled and the model has MoE layers."""
        if not config.enable:
            return None
        has_moe = any(
            getattr(m, "moe_enabled", False)
            for part in trainer.model_parts
            for m in part.modules()
        )
        return cls(trainer, config) if has_moe or trainer.parallel_dims.pp_enabled else None

    def _counts_LE(self) -> torch.Tensor | None:
        if not self.layers:
            return None
        rows = []
        for _, block, moe in self.layers:
            counts_E = _local(moe.tokens_per_expert_E)
            if getattr(block, "checkpoint_impl", None) is not None:
                counts_E = counts_E // 2  # full AC counts every token twice
            rows.append(counts_E)
        return torch.stack(rows).float()  # a copy: the hooks after this zero them

    def _capture(self) -> None:
        """On a logging step: the step's counts summed over ranks, as TorchTitan's
        bias update sums them, reduced to the figures; all on the device."""
        step = self.trainer.step
        if not self.trainer.metrics_processor.should_log(step):
            return
        counts_LE = self._counts_LE()
        if counts_LE is None:
            self._captured = (step, None, None)
            return
        pd = self.trainer.parallel_dims
        if pd.ep_enabled and pd.tp > 1:
            dist.all_reduce(counts_LE, group=pd.get_mesh("tp").get_group())
        loss_mesh = pd.get_optional_mesh("loss")
        if loss_mesh is not None:
            dist.all_reduce(counts_LE, group=loss_mesh.get_group())
        biases = [moe.expert_bias_E for _, _, moe in self.layers]
        bias_LE = None
        if all(b is not None for b in biases):
            bias_LE = torch.stack([_local(b) for b in biases])
        self._captured = (step, layer_stats(counts_LE, bias_LE, self.ep), counts_LE)

    def _zero_counts(self) -> None:
        counts = [_local(moe.tokens_per_expert_E) for _, _, moe in self.layers]
        if counts:
            torch._foreach_zero_(counts)

    def metrics(self, step: int) -> dict[str, float]:
        """This logging step's figures (and the heatmap written to TensorBoard)."""
        captured, self._captured = self._captured, None
        if captured is None or captured[0] != step:
            return {}  # e.g. the step's update was skipped (non-finite)
        _, stats, counts_LE = captured
        names = [name for name, _, _ in self.layers]
        rows = [] if stats is None else stats.tolist()
        heat = self.config.heatmap_freq and step % self.config.heatmap_freq == 0
        counts = [] if counts_LE is None or not heat else counts_LE.tolist()
        pd = self.trainer.parallel_dims
        if pd.pp_enabled:  # each stage holds its own layers
            gathered = [None] * pd.pp
            dist.all_gather_object(
                gathered, (names, rows, counts), group=pd.get_mesh("pp").get_group()
            )
            names = [n for g in gathered for n in g[0]]
            rows = [r for g in gathered for r in g[1]]
            counts = [c for g in gathered for c in g[2]]
        if not names:
            return {}
        out = {}
        keys = _PER_LAYER + (("ep_imbalance",) if self.ep > 1 else ())
        for name, row in zip(names, rows, strict=True):
            for key, value in zip(keys, row, strict=True):
                if key.startswith("bias") and value != value:  # NaN: no bias
                    continue
                out[f"routing/{_tag(name)}/{key}"] = value
        out["routing/imbalance_max"] = max(r[0] for r in rows)
        out["routing/empty_experts"] = sum(r[1] for r in rows)
        if counts:
            self._write_heatmap(torch.tensor(counts), step)
        return out

    def _write_heatmap(self, counts_LE: torch.Tensor, step: int) -> None:
        from torchtitan.components.metrics import TensorBoardLogger

        loggers = getattr(self.trainer.metrics_processor.logger, "_loggers", [])
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.writer.add_image(
                    "routing/load", heatmap_image(counts_LE), step, dataformats="HWC"
                )


def _tag(name: str) -> str:
    """``layers.3`` → ``layer3``, ``mtp.0`` → ``mtp0`` (one TensorBoard group each)."""
    return name.replace("mtp.", "mtp") if name.startswith("mtp.") else f"layer{name}"
