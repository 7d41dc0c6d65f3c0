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

from ..data.validation import link_to_training
from ..hf.config import args_from_model_config
from ..hf.dcp_convert import add_hf_config
from ..lora.converter import adapted_fqns
from ..low_precision import LowPrecisionConfig
from ..low_precision import config as low_precision
from ..low_precision.peak import use_fp8_peak
from ..pipeline import after_metadata_inference
from ..resilience import hooks as resilience
from ..resilience.checkpoint import ResilientCheckpointManager, resilient_config
from ..resilience.spike import SpikeConfig
from .mtp_loss import MTPLoss
from .routing_metrics import RoutingMetrics, RoutingMetricsConfig


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


def _full(t: torch.Tensor) -> torch.Tensor:
    """A loss term's value: under TP the loss is a DTensor on the TP mesh."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class NemotronHTrainer(Trainer):
    """TorchTitan's ``Trainer`` with the non-finite step guard of this module."""

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        nonfinite: NonFiniteConfig = field(default_factory=NonFiniteConfig)
        checkpoint: ResilientCheckpointManager.Config = field(
            default_factory=ResilientCheckpointManager.Config
        )
        """TorchTitan's checkpointing, commit-safe (``resilience/checkpoint.py``)."""
        spike: SpikeConfig = field(default_factory=SpikeConfig)
        """Opt-in loss-spike skipping (``resilience/spike.py``)."""
        kernel_backend: Literal["auto", "torch", "cuda"] | None = None
        """The Mamba2 ops of every ``M`` layer, as ``model_registry(kernel_backend=)``:
        "auto" (GPU kernels where installed and the tensors are on CUDA, else torch),
        "torch", "cuda"; None keeps what the config function chose."""

        moe_seq_aux_loss_coeff: float | None = None
        """NVIDIA's sequence-level MoE balance loss (``model/moe.py``; NVIDIA uses
        1e-4), added to the gradients of every MoE layer, logged as
        ``loss_metrics/moe_seq_aux_loss``; 0 is off; None keeps the model's."""

        mtp_num_layers: int | None = None
        """Multi-token prediction depth D: the flavor's stored MTP block applied D
        times (``model/mtp.py``); 0 turns MTP off (the block is not built); None
        keeps the flavor's (super-120B, ultra-550B: 2; others have no MTP)."""

        mtp_loss_scaling_factor: float | None = None
        """λ in L_main + λ/D · Σ_k CE_k; None keeps the flavor's (0.3)."""

        routing_metrics: RoutingMetricsConfig = field(
            default_factory=RoutingMetricsConfig
        )
        """Per-layer MoE routing figures and a load heatmap (``routing_metrics.py``)."""
        low_precision: LowPrecisionConfig = field(default_factory=LowPrecisionConfig)
        """FP8 rowwise / MXFP8 GEMMs (``low_precision/``), applied to the model's
        config tree here, once; the last settings win."""
        base_dtype: Literal["bf16", "nf4"] | None = None
        """A LoRA run's frozen base: "nf4" is QLoRA (``qlora/``: the base loaded
        straight into NF4 from ``checkpoint.initial_load_path``, checkpoints
        hold the adapters only); None keeps the config function's."""

        def __post_init__(self):
            Trainer.Config.__post_init__(self)  # (no super() in slots dataclasses)
            self.checkpoint = resilient_config(self.checkpoint)
            if self.model_spec is not None:
                self._apply_mtp_options()
                self._apply_low_precision()
            if self.base_dtype is not None and self.model_spec is not None:
                self.model_spec.model.base_dtype = self.base_dtype
            if self.kernel_backend is not None and self.model_spec is not None:
                for layer in self.model_spec.model.layers:
                    if hasattr(layer.mixer, "kernel_backend"):
                        layer.mixer.kernel_backend = self.kernel_backend
            if self.model_spec is not None:  # pretraining loaders check ids against it
                vocab = self.model_spec.model.vocab_size
                for dl in (self.dataloader, getattr(self.validator, "dataloader", None)):
                    if getattr(dl, "vocab_size", 0) is None:
                        dl.vocab_size = vocab
            link_to_training(self.dataloader, self.validator)
            coeff = self.moe_seq_aux_loss_coeff
            if coeff is not None and self.model_spec is not None:
                if not coeff >= 0:
                    raise ValueError(f"moe_seq_aux_loss_coeff={coeff}: must be >= 0")
                model = self.model_spec.model
                mtp = getattr(model, "mtp", None)
                for layer in [*model.layers, *(mtp.layers if mtp else [])]:
                    if hasattr(layer.mixer, "seq_aux_loss_coeff"):
                        layer.mixer.seq_aux_loss_coeff = coeff

        def _apply_low_precision(self) -> None:
            lp, spec = self.low_precision, self.model_spec
            compiled = self.compile.enable and "model" in self.compile.components
            low_precision.check_combination(
                lp,
                tensor_parallel_degree=self.parallelism.tensor_parallel_degree,
                ac_enabled=self.activation_checkpoint is not None,
                model_compiled=compiled,
            )
            if lp.enabled and any(True for _ in adapted_fqns(spec.model)):
                raise ValueError(
                    "low_precision with LoRA adapters in the model: not supported "
                    "(quantization must come before LoRA; the adapted base Linears "
                    "would stay bf16); set low_precision.linear/experts = 'bf16'"
                )
            spec.model = low_precision.apply(
                spec.model, lp, model_compile_enabled=compiled
            )

        def _apply_mtp_options(self) -> None:
            model, depth = self.model_spec.model, self.mtp_num_layers
            if depth is not None:
                if depth < 0:
                    raise ValueError(f"mtp_num_layers={depth}: must be >= 0")
                if depth == 0:
                    model.mtp = None
                elif getattr(model, "mtp", None) is None:
                    raise ValueError(
                        f"mtp_num_layers={depth}: flavor {self.model_spec.flavor!r} "
                        "has no MTP block (num_nextn_predict_layers=0)"
                    )
                else:
                    model.mtp.num_depths = depth
            scale = self.mtp_loss_scaling_factor
            if scale is not None:
                if not scale >= 0:
                    raise ValueError(f"mtp_loss_scaling_factor={scale}: must be >= 0")
                if getattr(model, "mtp", None) is not None:
                    model.mtp.loss_scaling_factor = scale

    def __init__(self, config: Config):
        low_precision.check_hardware(config.low_precision)
        try:
            super().__init__(config)
        except Exception as e:  # a setup timeout says what timed out
            resilience.name_setup_timeout(e, config.comm)
            raise
        if config.low_precision.enabled:
            # MFU against the FP8 peak (None: unknown device, MFU not logged).
            use_fp8_peak(self.metrics_processor)
        if getattr(config.model_spec.model, "base_dtype", None) == "nf4":
            self._load_nf4_base(config)
        resilience.after_init(self)
        if isinstance(self.checkpointer, ResilientCheckpointManager):
            # config.json inside the HF last step, before its commit (a kill after
            # the commit must not leave an export without it)
            self.checkpointer.before_hf_commit = self._add_hf_config
        self.skipped_steps = 0  # by this process; not checkpointed
        self.consecutive_skips = 0
        self._loss_is_finite: torch.Tensor | None = None
        handle = self.optimizers.register_step_pre_hook(self._check_update)
        # Before TorchTitan's MoE load-balancing hook: a refused step must not move
        # the routing bias either.
        self.optimizers._optimizer_step_pre_hooks.move_to_end(handle.id, last=False)
        self._mtp_loss: MTPLoss | None = None
        mtp = getattr(config.model_spec.model, "mtp", None)
        if mtp is not None:
            self._wire_mtp(mtp)
        self._aux_moes = [
            m
            for part in self.model_parts
            for m in part.modules()
            if getattr(m, "seq_aux_loss_coeff", 0) > 0
        ]
        # What holds each forward's aux loss for logging: the main layers' MoEs,
        # and the MTP block (its MoE runs once per depth; the block sums them).
        self._aux_sources = [
            block.moe
            for part in self.model_parts
            for block in part.get_submodule("layers").values()
            if block.moe_enabled and block.moe.seq_aux_loss_coeff > 0
        ] + [
            part.mtp
            for part in self.model_parts
            if getattr(part, "mtp", None) is not None
            and any(m.seq_aux_loss_coeff > 0 for m in self._aux_moes)
        ]
        self._aux_loss_sum: torch.Tensor | None = None
        # Whether any layer has the aux loss: the same on every rank (a pipeline
        # stage may hold no MoE layer, and still joins the metric's reduction).
        self._aux_on = any(
            getattr(getattr(layer, "mixer", None), "seq_aux_loss_coeff", 0) > 0
            for layer in config.model_spec.model.layers
        )
        self._stage_aux: torch.Tensor | None = None
        if self._aux_moes:
            self._wire_seq_aux_loss()
            if self.parallel_dims.pp_enabled:
                self._wire_stage_aux_loss()
        if self._mtp_loss is not None or self._aux_on:
            self._log_extra_losses()
        self.routing_metrics = RoutingMetrics.attach(self, config.routing_metrics)
        if hasattr(self.dataloader, "data_metrics"):
            self._log_data_metrics()

    def _load_nf4_base(self, config) -> None:
        """QLoRA: fill the NF4 base (placeholders since ``parallelize``) from the
        HF checkpoint at ``initial_load_path``, or from the seeded init without
        one; checkpoints then hold the adapters only, and TorchTitan's own
        initial load is off (the base is re-derived here on every start)."""
        from torchtitan.components.checkpointer.base import MODEL

        from ..qlora.checkpoint import AdaptersOnly
        from ..qlora.load import fill_nf4_base

        ckpt = config.checkpoint
        path = ckpt.initial_load_path or None
        if path and not ckpt.initial_load_in_hf:
            raise ValueError(
                "base_dtype='nf4': the base is read from a HF checkpoint; set "
                "checkpoint.initial_load_in_hf = true"
            )
        for part in self.model_parts:
            fill_nf4_base(part, path, seed=config.debug.seed or 0)
        states = getattr(self.checkpointer, "states", None)
        if states is not None and MODEL in states:
            states[MODEL] = AdaptersOnly(self.model_parts)
        self.checkpointer.initial_load_path = None
        logger.info(f"QLoRA: NF4 base from {path or 'the seeded init'}")

    def _log_data_metrics(self) -> None:
        """The pretraining loader's per-source share and epoch join the log line's
        metrics (TensorBoard/W&B) and get a line of their own."""
        log = self.metrics_processor.log

        def log_with_data(step, *args, extra_metrics=None, **kwargs):
            data = self.dataloader.data_metrics()
            names = sorted({k.split("/")[1] for k in data})
            logger.info(
                "data: " + "  ".join(
                    f"{n} {data[f'data/{n}/share']:.4f} (epoch {data[f'data/{n}/epoch']:.3f})"
                    for n in names
                )
            )
            return log(step, *args, extra_metrics={**data, **(extra_metrics or {})}, **kwargs)

        self.metrics_processor.log = log_with_data

    def _wire_seq_aux_loss(self) -> None:
        """Each MoE layer's sequence aux loss is a sum over its batch rows; scaled
        by 1 / (rows of the global batch) it is a mean over rows, summed over
        layers, as Megatron's."""
        batch_ranks = 1
        if self.parallel_dims.dp_enabled:
            batch_ranks = self.parallel_dims.get_mesh("batch").size()
        rows = (
            self.config.training.local_batch_size
            * self.gradient_accumulation_steps
            * batch_ranks
        )
        for moe in self._aux_moes:
            moe.aux_loss_scale = 1.0 / rows

    def _wire_stage_aux_loss(self) -> None:
        """Under PP the schedule runs every microbatch inside one
        ``forward_backward_step``, so each MoE's ``last_aux_loss`` is the last
        microbatch's: each stage module's forward hook adds its layers' values per
        microbatch (the stage's forward runs once per microbatch, activation
        recomputation runs blocks, not the stage); the shape-inference pass's are
        dropped."""

        def add(sources, *_):
            values = [
                _local(m.last_aux_loss) for m in sources if m.last_aux_loss is not None
            ]
            if values:
                total = torch.stack(values).sum()
                before = self._stage_aux
                self._stage_aux = total if before is None else before + total

        for part in self.model_parts:
            mine = {id(m) for m in part.modules()}
            sources = [m for m in self._aux_sources if id(m) in mine]
            part.register_forward_hook(lambda *a, sources=sources: add(sources, *a))

        def forget() -> None:
            self._stage_aux = None

        after_metadata_inference(self.pp_schedule, forget)

    def _log_extra_losses(self) -> None:
        """Per-depth MTP losses and the sequence aux loss join TorchTitan's log
        line's metrics (the logged loss stays the main LM loss)."""
        log = self.metrics_processor.log

        def log_with_extra_losses(step, *args, extra_metrics=None, **kwargs):
            terms = self._extra_loss_terms()
            if terms:
                logger.info(
                    "losses: " + "  ".join(f"{k}: {v:8.5f}" for k, v in terms.items())
                )
            extra = {f"loss_metrics/{k}": v for k, v in terms.items()}
            extra.update(extra_metrics or {})
            return log(step, *args, extra_metrics=extra, **kwargs)

        self.metrics_processor.log = log_with_extra_losses

    def _wire_mtp(self, mtp) -> None:
        """Multi-token prediction: the loss becomes ``L_main + λ/D · Σ CE_k``
        (``mtp_loss.py``); the logged loss stays the main LM loss and each depth's
        CE is logged as ``loss_metrics/mtp_k``; validation scores the main output.
        Under PP the schedule, built with the plain loss, gets the MTP one (the
        block is on the last stage; ``post_dataloading_process`` stacks its labels)."""
        self._mtp_loss = MTPLoss(self.loss_fn, mtp.num_depths, mtp.loss_scaling_factor)
        self.loss_fn = self._mtp_loss
        if self.parallel_dims.pp_enabled:
            pipeline_loss = self._mtp_loss.pipeline_loss
            # TorchTitan's schedules take a scalar loss (its ``_scalar_loss_fn``).
            self.pp_schedule._loss_fn = lambda *a, **k: pipeline_loss(*a, **k)[0]
            after_metadata_inference(self.pp_schedule, self._mtp_loss.forget_calls)
        validator = getattr(self, "validator", None)
        if validator is not None and hasattr(validator, "loss_fn"):
            validator.loss_fn = self._mtp_loss.main_only
        # TorchTitan's routing-bias update walks ``model.layers`` only; the MTP
        # block's MoE gets the same update (after the non-finite check), unless
        # the base model is frozen (LoRA: no load-balancing hook at all).
        if self.config.model_spec.post_optimizer_build_fn is not None:
            self.optimizers.register_step_pre_hook(self._update_mtp_expert_bias)

    def _update_mtp_expert_bias(self, *_) -> None:
        """TorchTitan's aux-loss-free update for the MTP block's MoE layers:
        bias += coeff · sign(mean load - load), centred; loads summed over ranks."""
        for model_part in self.model_parts:
            mtp = getattr(model_part, "mtp", None)
            for block in [] if mtp is None else mtp.layers.values():
                if not block.moe_enabled or block.moe.load_balance_coeff is None:
                    continue
                moe = block.moe
                counts_E = _local(moe.tokens_per_expert_E).clone()
                if getattr(block, "checkpoint_impl", None) is not None:
                    counts_E = counts_E // 2  # full AC counts every token twice
                pd = self.parallel_dims
                if pd.ep_enabled and pd.tp > 1:
                    dist.all_reduce(counts_E, group=pd.get_mesh("tp").get_group())
                loss_mesh = pd.get_optional_mesh("loss")
                if loss_mesh is not None:
                    dist.all_reduce(counts_E, group=loss_mesh.get_group())
                with torch.no_grad():
                    delta_E = moe.load_balance_coeff * torch.sign(
                        counts_E.mean() - counts_E
                    )
                    delta_E = delta_E - delta_E.mean()
                    _local(moe.expert_bias_E).add_(delta_E)
                    _local(moe.tokens_per_expert_E).zero_()

    def _extra_loss_terms(self) -> dict[str, float]:
        """This step's per-depth MTP CEs and sequence aux loss, global (each
        rank's value is its share, so they are summed over the loss mesh)."""
        terms = {}
        if self._mtp_loss is not None:
            terms = self._mtp_loss.pop_terms()
            terms.pop("main", None)  # logged as the loss itself
        if self._aux_loss_sum is not None:
            terms["moe_seq_aux_loss"] = self._aux_loss_sum
            self._aux_loss_sum = None
        elif self._aux_on and self.parallel_dims.pp_enabled:  # a stage without MoE
            terms["moe_seq_aux_loss"] = torch.zeros((), device=self.device)
        if not terms:
            return {}
        names = sorted(terms)
        values = torch.stack([_full(terms[k]).float().to(self.device) for k in names])
        if self.parallel_dims.dp_cp_enabled:
            loss_group = self.parallel_dims.get_mesh("loss").get_group()
            dist.all_reduce(values, group=loss_group)
        if "moe_seq_aux_loss" in names and self.parallel_dims.pp_enabled:
            i = names.index("moe_seq_aux_loss")  # each stage: its own layers' share
            aux = values[i].clone()
            dist.all_reduce(aux, group=self.parallel_dims.get_mesh("pp").get_group())
            values[i] = aux
        return dict(zip(names, values.tolist(), strict=True))

    def _counting_mtp_tokens(self, data_iterator):
        """The step's batches, each counted per MTP depth as it is fetched."""
        for input_dict, labels in data_iterator:
            self._mtp_loss.count_batch(labels, input_dict.get("positions"))
            yield input_dict, labels

    def init_distributed(self):
        resilience.bound_new_group_timeouts(self.config.comm)  # mesh groups included
        return super().init_distributed()

    def train(self) -> None:
        if resilience.run_is_complete(self):
            return
        try:
            super().train()
        except Exception as e:
            resilience.name_timed_out_collective(e)
            raise
        if self.preemption.stopped_at is not None:
            return
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
        self._add_hf_config(export_dir)

    def _add_hf_config(self, export_dir: str) -> None:
        checkpoint = self.config.checkpoint
        assets = self.config.hf_assets_path
        config_path = add_hf_config(
            export_dir,
            args_from_model_config(self.config.model_spec.model),
            dtype=checkpoint.export_dtype,
            assets_dir=assets if assets and os.path.isdir(assets) else None,
        )
        logger.info(f"HF export complete: {config_path} (+ tokenizer files if any)")

    def should_continue_training(self) -> bool:
        return not resilience.preempted(self) and super().should_continue_training()

    def post_dataloading_process(self, input_dict, labels):
        """TorchTitan's, plus, for MTP under PP, each depth's labels stacked: the
        schedule calls the loss without ``positions`` (``MTPLoss.stack_labels``)."""
        resilience.apply_pending_rng()  # a resumed run's RNG state (resilience/rng.py)
        inputs, labels, extra_kwargs = super().post_dataloading_process(input_dict, labels)
        if self._mtp_loss is not None and self.parallel_dims.pp_enabled:
            labels = self._mtp_loss.stack_labels(labels, extra_kwargs.get("positions"))
        return inputs, labels, extra_kwargs

    def forward_backward_step(self, **kwargs) -> torch.Tensor:
        if self._mtp_loss is not None:
            self._mtp_loss.pop_main()
        loss = super().forward_backward_step(**kwargs)
        if self._spike_guard is not None:
            self._step_loss = self._step_loss + _local(loss.detach()).float().sum()
        finite = torch.isfinite(_local(loss.detach())).all()
        self._loss_is_finite = finite & self._loss_is_finite
        if self._aux_moes:
            scale = self._aux_moes[0].aux_loss_scale  # the same for every layer
            aux = sum(
                _local(m.last_aux_loss) * scale
                for m in self._aux_sources
                if m.last_aux_loss is not None
            )
            if self.parallel_dims.pp_enabled:  # every microbatch's (see above)
                aux, self._stage_aux = self._stage_aux, None
                aux = 0 if aux is None else aux * scale
            if isinstance(aux, torch.Tensor):
                self._aux_loss_sum = (
                    aux if self._aux_loss_sum is None else self._aux_loss_sum + aux
                )
        if self._mtp_loss is not None:
            main = self._mtp_loss.pop_main()  # None on a pipeline stage before the last
            if main is not None:
                return main  # logged as the loss, as without MTP
        return loss

    def train_step(self, data_iterator) -> None:
        self._loss_is_finite = torch.ones((), dtype=torch.bool, device=self.device)
        self._step_loss = torch.zeros((), device=self.device)
        self._aux_loss_sum = None
        if self._mtp_loss is not None:
            self._mtp_loss.start_step(self._sum_over_batch)
            data_iterator = self._counting_mtp_tokens(data_iterator)
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

    def _sum_over_batch(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device)
        if self.parallel_dims.dp_enabled:
            dist.all_reduce(t, group=self.parallel_dims.get_mesh("batch").get_group())
        return t

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
            if self._spike_guard is not None and resilience.loss_spike(self):
                raise _SkipUpdate  # the same skip as a non-finite step's
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
