"""Pipeline parallelism for NemotronH: where the stages split, on TorchTitan's
``pipeline_llm`` (split, per-stage ``parallelize_fn``, schedule all TorchTitan's).

Where the stages split:

- a Megatron pattern with ``|`` (``"MEM*|EM-M|..."``): segment i is (virtual)
  stage i, as Megatron means it; stage i runs on rank i % pp (TorchTitan's "loop"
  style), so 1F1B needs pp segments and Interleaved1F1B a multiple of pp;
- otherwise a split balanced by cost. NemotronH's layers cost very different
  amounts (Nano: a MoE layer ~2x a Mamba layer, an MLP layer a fraction, lm_head
  over a 131K vocabulary ~4 MoE layers; Super's MTP block, on the last stage,
  runs twice), so TorchTitan's layer-count split is not balanced. The cost of a
  stage is its training FLOPs per token (``model/flops.py``'s terms), parameters
  breaking ties; the embeddings go with the first stage and norm + lm_head (and
  the MTP block) with the last, at their cost (TorchTitan's
  ``pipeline_parallel_{first,last}_stage_less_layers`` weights are not used).

How many stages: the segments, or TorchTitan's count (one per rank for 1F1B/GPipe,
two for looped schedules, or from ``pipeline_parallel_layers_per_stage``); an
explicit ``module_fqns_per_model_part`` is used as given.
"""

import dataclasses
import inspect
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from torch.distributed.pipelining.schedules import (
    PipelineScheduleSingle,
    ScheduleDualPipeV,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
    get_schedule_class,
)
from torchtitan.distributed.pipeline_parallel import (
    _get_pipeline_metadata,
    pipeline_llm,
)
from torchtitan.models.common.linear import Linear
from torchtitan.tools.logging import logger

from .model.args import NemotronHArgs
from .model.flops import attention_flops_per_token, ssd_flops_per_token
from .model.pattern import ATTENTION, MAMBA, MOE

# Stage costs are computed at this sequence length when none is given (attention's
# FLOPs grow with it); the split barely depends on it.
DEFAULT_SEQ_LEN = 4096


@dataclass(frozen=True)
class Cost:
    """Training FLOPs per token and parameter count of a piece of the model."""

    flops: int
    params: int

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.params + other.params)


def _has_mtp(args) -> bool:
    """Whether ``NemotronHArgs`` or a model config trains an MTP block."""
    if isinstance(args, NemotronHArgs):
        return args.mtp_num_layers > 0
    return getattr(args, "mtp", None) is not None


def _layers_and_segments(args) -> tuple[int, tuple[int, ...] | None]:
    """(number of layers, ``|`` segments) of ``NemotronHArgs`` or a model config."""
    if isinstance(args, NemotronHArgs):
        return args.num_hidden_layers, args.pipeline_segments
    return len(args.layers), args.pipeline_segments


def _matmul_params(cfg) -> int:
    """Weights (+ biases) of every ``Linear`` in a module config: what one token
    multiplies through, 2 FLOPs each forward, 6 in training."""
    return sum(
        c.in_features * c.out_features + (c.out_features if c.bias else 0)
        for _, c, *_ in cfg.traverse(Linear.Config)
    )


def _num_params(cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in cfg.build().parameters())


def _layer_cost(layer, seq_len: int) -> Cost:
    m = layer.mixer
    if layer.layer_type == MOE:
        experts = m.routed_experts.inner_experts
        expert = 2 * experts.dim * experts.hidden_dim
        active = _matmul_params(m.router) + _matmul_params(m.shared_experts)
        flops = 6 * (active + m.router.top_k * expert)
    else:
        flops = 6 * _matmul_params(m)
        if layer.layer_type == MAMBA:
            flops += ssd_flops_per_token(m)
        elif layer.layer_type == ATTENTION:
            flops += attention_flops_per_token(m, seq_len)
    return Cost(flops, _num_params(layer))


def piece_costs(
    model_config, seq_len: int = DEFAULT_SEQ_LEN
) -> tuple[Cost, list[Cost], Cost]:
    """(embeddings, one cost per layer, norm + lm_head) of a ``NemotronHModel.Config``
    (``build_model_config(args)``). The embedding lookup has no matmul (0 FLOPs,
    V·D parameters); lm_head is 6·V·D FLOPs per token; the MTP block, when on,
    counts with the head (its D passes, each with a pass through lm_head)."""
    cfg = model_config
    embed = Cost(0, _num_params(cfg.tok_embeddings))
    head = Cost(
        6 * _matmul_params(cfg.lm_head),
        _num_params(cfg.lm_head) + _num_params(cfg.norm),
    )
    mtp = getattr(cfg, "mtp", None)
    if mtp is not None:  # on the last stage: D passes of the block and the head
        per_depth = 6 * _matmul_params(cfg.lm_head) + sum(
            _layer_cost(layer, seq_len).flops
            + (6 * _matmul_params(layer.eh_proj) if layer.eh_proj else 0)
            for layer in mtp.layers
        )
        head = head + Cost(mtp.num_depths * per_depth, _num_params(mtp))
    return embed, [_layer_cost(layer, seq_len) for layer in cfg.layers], head


def stage_costs(
    model_config, ranges: list[range], seq_len: int = DEFAULT_SEQ_LEN
) -> list[Cost]:
    """Cost of each stage of a split: its layers, plus the embeddings on the
    first and norm + lm_head on the last."""
    embed, layers, head = piece_costs(model_config, seq_len)
    costs = [sum((layers[i] for i in r), Cost(0, 0)) for r in ranges]
    costs[0] = costs[0] + embed
    costs[-1] = costs[-1] + head
    return costs


def _balanced_ranges(
    embed: Cost, layers: list[Cost], head: Cost, num_stages: int
) -> list[range]:
    """Contiguous split minimising the costliest stage's FLOPs (exact: dynamic
    programming over split points, O(S·L²)), then, among equal ones, the largest
    stage parameter count. Inner stages get at least one layer; an end stage may
    hold only the embeddings, or only norm + lm_head, when that is cheapest."""
    n = len(layers)
    prefix = [Cost(0, 0)]
    for c in layers:
        prefix.append(prefix[-1] + c)

    def cost(stage: int, lo: int, hi: int) -> tuple[int, int]:
        c = Cost(prefix[hi].flops - prefix[lo].flops, prefix[hi].params - prefix[lo].params)
        if stage == 0:
            c = c + embed
        if stage == num_stages - 1:
            c = c + head
        return (c.flops, c.params)

    def worse(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
        return (max(a[0], b[0]), max(a[1], b[1]))

    inf = (float("inf"), float("inf"))
    # best[s][j]: the best worst-stage cost of stages 0..s over layers [0, j),
    # with the split point that gives it.
    best = [[(inf, -1)] * (n + 1) for _ in range(num_stages)]
    for j in range(n + 1):
        best[0][j] = (cost(0, 0, j), 0)
    for s in range(1, num_stages):
        last = s == num_stages - 1
        for j in range(n + 1):
            if last and j != n:
                continue
            for k in range(j + 1):
                if k == j and not last:
                    continue  # an inner stage holds at least one layer
                prev = best[s - 1][k][0]
                if prev == inf:
                    continue
                cand = worse(prev, cost(s, k, j))
                if cand < best[s][j][0]:
                    best[s][j] = (cand, k)
    bounds, j = [n], n
    for s in range(num_stages - 1, 0, -1):
        j = best[s][j][1]
        bounds.append(j)
    bounds.append(0)
    bounds.reverse()
    return [range(bounds[i], bounds[i + 1]) for i in range(num_stages)]


def stage_layer_ranges(
    model_config, num_stages: int | None = None, seq_len: int = DEFAULT_SEQ_LEN
) -> list[range]:
    """Layer indices of each pipeline (virtual) stage, in stage order.

    ``model_config``: a ``NemotronHModel.Config`` (``build_model_config(args)``).
    With the pattern's ``|`` segments the split is theirs (``num_stages`` must be
    their count, or None); otherwise the cost-balanced split into ``num_stages``.
    """
    num_layers, segments = _layers_and_segments(model_config)
    if segments is not None:
        if num_stages is not None and num_stages != len(segments):
            raise ValueError(
                f"{num_stages} pipeline stages asked for, but the pattern's '|' "
                f"separators give {len(segments)} segments {list(segments)}"
            )
        starts = [sum(segments[:i]) for i in range(len(segments) + 1)]
        return [range(starts[i], starts[i + 1]) for i in range(len(segments))]
    if num_stages is None or not 1 <= num_stages <= num_layers:
        raise ValueError(
            f"{num_stages} pipeline stages for {num_layers} layers: need between 1 "
            f"and {num_layers} stages (at least one layer per stage)"
        )
    embed, layers, head = piece_costs(model_config, seq_len)
    return _balanced_ranges(embed, layers, head, num_stages)


def module_fqns_per_stage(ranges: list[range], mtp: bool = False) -> list[list[str]]:
    """TorchTitan's ``module_fqns_per_model_part`` for a split; the MTP block
    (``mtp``) goes with the head on the last stage."""
    fqns = [[f"layers.{i}" for i in r] for r in ranges]
    fqns[0].insert(0, "tok_embeddings")
    fqns[-1].extend(["norm", "lm_head", *(["mtp"] if mtp else [])])
    return fqns


def _num_stages(args, parallelism) -> int:
    """How many (virtual) stages: the ``|`` segments, or TorchTitan's count from
    the schedule (1 per rank, 2 for looped schedules) or ``layers_per_stage``."""
    num_layers, segments = _layers_and_segments(args)
    if segments is not None:
        return len(segments)
    if parallelism.module_fqns_per_model_part is not None:
        return len(parallelism.module_fqns_per_model_part)
    num_stages, *_ = _get_pipeline_metadata(
        SimpleNamespace(pp=parallelism.pipeline_parallel_degree),
        parallelism,
        SimpleNamespace(layers=range(num_layers)),
    )
    return num_stages


def check_pipeline_parallel(
    args, parallelism, *, local_batch_size: int | None = None
) -> None:
    """Raise a one-line ``ValueError`` naming the numbers for a pipeline layout
    NemotronH cannot run. ``args``: ``NemotronHArgs`` or ``NemotronHModel.Config``;
    ``local_batch_size`` (``training.local_batch_size``) enables the microbatch
    checks. A no-op without pipeline parallelism."""
    pp = parallelism.pipeline_parallel_degree
    if pp <= 1:
        return
    num_layers, segments = _layers_and_segments(args)
    explicit = parallelism.module_fqns_per_model_part
    if explicit and _has_mtp(args) and "mtp" not in explicit[-1]:
        raise ValueError(
            "parallelism.module_fqns_per_model_part: the model has an MTP block, so "
            "the last part must list 'mtp' (with 'norm' and 'lm_head'), got "
            f"{explicit[-1]}"
        )
    name = parallelism.pipeline_parallel_schedule
    try:
        schedule = get_schedule_class(name)
    except ValueError as e:
        raise ValueError(f"parallelism.pipeline_parallel_schedule={name!r}: {e}") from None
    single = issubclass(schedule, PipelineScheduleSingle)
    if segments is not None:
        where = f"the pattern's {len(segments)} '|' segments {list(segments)}"
        if parallelism.module_fqns_per_model_part is not None:
            raise ValueError(
                f"parallelism.module_fqns_per_model_part and {where} both say where "
                "the stages split: keep one"
            )
        if parallelism.pipeline_parallel_layers_per_stage is not None:
            raise ValueError(
                "parallelism.pipeline_parallel_layers_per_stage="
                f"{parallelism.pipeline_parallel_layers_per_stage} and {where} both "
                "say where the stages split: keep one"
            )
        if schedule in (ScheduleZBVZeroBubble, ScheduleDualPipeV):
            raise ValueError(
                f"parallelism.pipeline_parallel_schedule={name!r} places stages in a V; "
                f"{where} mean segment i on rank i % pp: use a looped schedule"
            )
        if len(segments) % pp:
            raise ValueError(
                f"{where} are not a multiple of "
                f"parallelism.pipeline_parallel_degree={pp}"
            )
        empty = [i for i in range(1, len(segments) - 1) if segments[i] == 0]
        if empty:
            raise ValueError(f"{where}: inner segments {empty} hold no layer")
        num_stages = len(segments)
        per_rank = num_stages // pp
        if single and per_rank != 1:
            raise ValueError(
                f"parallelism.pipeline_parallel_schedule={name!r} runs one stage per "
                f"rank, but {where} give {per_rank} per rank at "
                f"pipeline_parallel_degree={pp}"
            )
        if not single and per_rank < 2:
            raise ValueError(
                f"parallelism.pipeline_parallel_schedule={name!r} needs >= 2 stages per "
                f"rank, but {where} give {per_rank} at pipeline_parallel_degree={pp}"
            )
    else:
        num_stages = _num_stages(args, parallelism)
        if parallelism.module_fqns_per_model_part is None and num_stages > num_layers:
            raise ValueError(
                f"{num_stages} pipeline stages (parallelism.pipeline_parallel_degree="
                f"{pp}, schedule {name!r}) for {num_layers} layers: at most one stage "
                "per layer"
            )
    if local_batch_size is None:
        return
    mbs = parallelism.pipeline_parallel_microbatch_size
    if mbs <= 0 or local_batch_size % mbs:
        raise ValueError(
            f"training.local_batch_size={local_batch_size} is not a multiple of "
            f"parallelism.pipeline_parallel_microbatch_size={mbs}"
        )
    n_microbatches = local_batch_size // mbs
    if n_microbatches < num_stages:
        raise ValueError(
            f"{n_microbatches} microbatches (training.local_batch_size={local_batch_size}"
            f" / pipeline_parallel_microbatch_size={mbs}) for {num_stages} pipeline "
            "stages: need at least one microbatch per stage"
        )
    if schedule is ScheduleInterleaved1F1B:
        rounds = max(1, n_microbatches // pp)
        if n_microbatches % rounds:
            raise ValueError(
                f"{n_microbatches} microbatches: Interleaved1F1B needs a multiple of "
                f"{rounds} (microbatches // pipeline_parallel_degree={pp})"
            )


def _stages_of(schedule) -> list:
    return list(getattr(schedule, "_stages", None) or [schedule._stage])


def _accept_presplit_microbatches(schedule) -> None:
    """TorchTitan 0.3.0's trainer and validator call ``schedule.step`` / ``eval``
    with microbatches it split itself (``arg_mbs=, kwarg_mbs=, target_mbs=``: each
    with its own ``positions``); torch 2.13's ``step`` only takes a whole batch, so
    those names would reach the model as keyword arguments. Where ``step`` lacks
    them (feature-detected), this adds them to this schedule: the same preamble as
    torch's ``step``, then its ``_step_microbatches`` on the given microbatches."""
    if "arg_mbs" in inspect.signature(type(schedule).step).parameters:
        return
    whole_batch_step = schedule.step

    def step(
        *args,
        arg_mbs=None,
        kwarg_mbs=None,
        target_mbs=None,
        target=None,
        losses=None,
        return_outputs=True,
        loss_kwargs=None,
        **kwargs,
    ):
        if arg_mbs is None and kwarg_mbs is None and target_mbs is None:
            return whole_batch_step(
                *args,
                target=target,
                losses=losses,
                return_outputs=return_outputs,
                loss_kwargs=loss_kwargs,
                **kwargs,
            )
        if args or kwargs or target is not None:
            raise TypeError("pass either a whole batch or microbatch lists, not both")
        if schedule._has_backward and not torch.is_grad_enabled():
            raise RuntimeError("step() with backward needs gradients enabled; use eval()")
        stages = _stages_of(schedule)
        for stage in stages:
            stage.has_backward = schedule._has_backward
            stage.clear_runtime_states()
        schedule._step_microbatches(
            arg_mbs, kwarg_mbs, target_mbs, losses, return_outputs, loss_kwargs=loss_kwargs
        )
        for stage in stages:
            if stage.is_last and return_outputs:
                return schedule._merge_outputs(stage.output_chunks)
        return None

    schedule.step = step


def after_metadata_inference(schedule, fn) -> None:
    """Run ``fn()`` once PyTorch's stages have inferred their shapes: on the first
    ``step()`` they run one real forward and backward (on empty tensors past the
    first stage), loss included, before the step's microbatches."""
    for stage in _stages_of(schedule):
        cleanup = stage._post_metadata_inference_cleanup

        def cleanup_then(cleanup=cleanup) -> None:
            cleanup()
            fn()

        stage._post_metadata_inference_cleanup = cleanup_then


def _forget_metadata_inference_counts(schedule) -> None:
    """Our MoE layers count routed tokens for the load-balancing bias in forward:
    drop the shape-inference pass's counts, so the first update sees only the
    training tokens."""

    def forget() -> None:
        with torch.no_grad():
            for stage in _stages_of(schedule):
                for module in stage.submod.modules():
                    if getattr(module, "moe_enabled", False):
                        module.moe.tokens_per_expert_E.zero_()

    after_metadata_inference(schedule, forget)


def pipeline_nemotronh(model: nn.Module, *, parallelism, training, model_config, **kwargs):
    """NemotronH's ``ModelSpec.pipelining_fn``: TorchTitan's ``pipeline_llm`` with
    the stage split of this module (unless ``module_fqns_per_model_part`` is set)."""
    check_pipeline_parallel(
        model_config, parallelism, local_batch_size=training.local_batch_size
    )
    if parallelism.module_fqns_per_model_part is None:
        num_stages = _num_stages(model_config, parallelism)
        ranges = stage_layer_ranges(model_config, num_stages, seq_len=training.seq_len)
        costs = stage_costs(model_config, ranges, seq_len=training.seq_len)
        how = "'|' segments" if model_config.pipeline_segments else "cost-balanced"
        logger.info(
            f"NemotronH pipeline stages ({how}): "
            + ", ".join(
                f"{s}: layers [{r.start}, {r.stop}) {c.flops / 1e6:.1f} MFLOP/token"
                for s, (r, c) in enumerate(zip(ranges, costs))
            )
        )
        parallelism = dataclasses.replace(
            parallelism,
            module_fqns_per_model_part=module_fqns_per_stage(
                ranges, mtp=_has_mtp(model_config)
            ),
        )
    schedule, model_parts, has_first, has_last = pipeline_llm(
        model,
        parallelism=parallelism,
        training=training,
        model_config=model_config,
        **kwargs,
    )
    _accept_presplit_microbatches(schedule)
    _forget_metadata_inference_counts(schedule)
    return schedule, model_parts, has_first, has_last
