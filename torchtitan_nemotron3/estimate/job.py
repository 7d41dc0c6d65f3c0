"""A training job as the dry run needs it: from a TOML job file (TorchTitan's
parser, via ``train/toml_config.py``) or a flavor, with command-line overrides.

Why its own reader: a job whose config function cannot be built here (one that
fails validation on this machine) is still sized from its file's
``[parallelism]``, ``[training]`` and ``[activation_checkpoint]`` tables.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from types import SimpleNamespace

CONFIG_FUNCTIONS = {
    "debugmodel": "nemotron3_debugmodel",
    "nano-30B": "nemotron3_nano_30b",
}


@dataclass
class Job:
    """What a dry run needs from a training job."""

    flavor: str
    model_spec: object  # torchtitan ModelSpec
    parallelism: object  # ParallelismConfig
    training: object  # TrainingConfig
    ac: str  # none | selective | full
    ngpu: int
    source: str


_FLAGS = {  # our flag -> TorchTitan field
    "ep": "parallelism.expert_parallel_degree",
    "tp": "parallelism.tensor_parallel_degree",
    "pp": "parallelism.pipeline_parallel_degree",
    "cp": "parallelism.context_parallel_degree",
    "dp_shard": "parallelism.data_parallel_shard_degree",
    "dp_replicate": "parallelism.data_parallel_replicate_degree",
    "seq_len": "training.seq_len",
    "local_batch_size": "training.local_batch_size",
    "global_batch_size": "training.global_batch_size",
    "param_dtype": "training.mixed_precision_param",
}


def _ac_name(ac_config) -> str:
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

    if isinstance(ac_config, SelectiveAC.Config):
        return "selective"
    if isinstance(ac_config, FullAC.Config):
        return "full"
    return "none"


def _set(obj, dotted: str, value) -> None:
    section, field = dotted.split(".")
    setattr(getattr(obj, section), field, value)


def job_from_args(a) -> Job:
    """From a TOML job (TorchTitan's parser, via ``train/toml_config.py``) or from
    a flavor and the package's config function defaults; flags override both."""
    from torchtitan.config import ParallelismConfig, TrainingConfig

    from .. import model_registry

    overrides = {k: getattr(a, k) for k in _FLAGS if getattr(a, k) is not None}
    if a.config:
        from ..train.toml_config import ConfigError, load_job

        try:
            config, _ = load_job(a.config, list(getattr(a, "overrides", [])))
        except ConfigError:
            raise
        except ValueError as e:  # the config function itself failed
            print(
                f"note: {a.config}: its config function failed ({e}); reading "
                "[parallelism], [training], [activation_checkpoint] from the file",
                file=sys.stderr,
            )
            config = _tables_only(a.config, a.flavor)
        spec = config.model_spec
        holder = SimpleNamespace(
            parallelism=config.parallelism, training=config.training
        )
        ac = _ac_name(config.activation_checkpoint)
        flavor, source = spec.flavor, a.config
    else:
        flavor = a.flavor or "nano-30B"
        spec = model_registry(flavor)
        holder = SimpleNamespace(
            parallelism=ParallelismConfig(
                spmd_backend="partial_dtensor", data_parallel_shard_degree=-1
            ),
            training=TrainingConfig(local_batch_size=1, seq_len=8192),
        )
        ac, source = "selective", f"flavor {flavor}"
    spec = _lora_overrides(a, flavor, spec)
    for key, value in overrides.items():
        _set(holder, _FLAGS[key], value)
    return Job(
        flavor,
        spec,
        holder.parallelism,
        holder.training,
        a.ac or ac,
        a.ngpu or int(os.environ.get("NGPU", "8")),
        source,
    )


def _tables_only(path: str, flavor: str | None) -> SimpleNamespace:
    """The layout tables of a TOML job over TorchTitan's defaults, when its
    config function cannot be built here; the flavor from ``[job] config``."""
    import tomllib

    from torchtitan.config import ParallelismConfig, TrainingConfig
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

    from .. import model_registry

    with open(path, "rb") as f:
        data = tomllib.load(f)
    fn = data.get("job", {}).get("config", "")
    flavor = flavor or next(
        (fl for fl, name in CONFIG_FUNCTIONS.items() if fn.startswith(name)), None
    )
    if flavor is None:
        raise ValueError(f"{path}: [job] config = {fn!r}: give --flavor")
    parallelism = ParallelismConfig(spmd_backend="partial_dtensor")
    training = TrainingConfig()
    for obj, table in ((parallelism, "parallelism"), (training, "training")):
        for key, value in data.get(table, {}).items():
            setattr(obj, key, value)
    mode = data.get("activation_checkpoint", {}).get("mode", "selective")
    ac = {"selective": SelectiveAC.Config(), "full": FullAC.Config()}.get(mode)
    return SimpleNamespace(
        model_spec=model_registry(flavor),
        parallelism=parallelism,
        training=training,
        activation_checkpoint=ac,
    )


def _lora_overrides(a, flavor: str, spec):
    """``--lora_rank`` (LoRA on the default targets, alpha 2·rank),
    ``--base_dtype``, ``--nf4_lm_head`` applied to the job's model spec."""
    import copy

    from .. import model_registry
    from ..lora import NemotronHLoRAConverter

    rank = getattr(a, "lora_rank", None)
    base_dtype = getattr(a, "base_dtype", None)
    lm_head = getattr(a, "nf4_lm_head", None)
    if rank is not None:
        return model_registry(
            flavor,
            converters=[NemotronHLoRAConverter.Config(rank=rank, alpha=2.0 * rank)],
            base_dtype=base_dtype,
            nf4_lm_head=bool(lm_head),
        )
    if base_dtype is None and lm_head is None:
        return spec
    if not _has_lora(spec.model):
        raise ValueError("--base_dtype / --nf4_lm_head need a LoRA job (or --lora_rank)")
    spec = copy.copy(spec)
    spec.model = copy.deepcopy(spec.model)
    if base_dtype is not None:
        spec.model.base_dtype = base_dtype
    if lm_head is not None:
        spec.model.nf4_lm_head = lm_head
    return spec


def _has_lora(model_config) -> bool:
    from ..lora.converter import adapted_fqns

    return any(True for _ in adapted_fqns(model_config))
