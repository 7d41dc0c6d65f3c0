"""A training job file as the source of truth for the steps after training.

``run_train.sh`` trains from ``train_configs/<job>.toml`` plus ``--section.field
VALUE`` overrides; generation, conversion, evaluation and the dry run read the same
file and overrides here, so nothing the job already knows is typed again: the
architecture (``model_spec``, with its converters: LoRA rank/alpha), the tokenizer
and chat template (``hf_assets_path``) and the checkpoints (``dump_folder`` /
``checkpoint.folder``)::

    config = load_job("train_configs/debug_sft.toml", ["--training.steps", "50"])
    step_dir = latest_checkpoint(config)     # newest complete step-N, or None
    args = model_args(config)                # NemotronHArgs of the trained model

Relative paths in the file resolve against the working directory, as for
``run_train.sh``: run from the directory you trained from. Errors are the one-line
``ConfigError`` (a ``ValueError``) that ``run_train.sh``'s job check prints.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from .train.toml_config import ConfigError
from .train.toml_config import load_job as _load_job
from .train.trainer import NemotronHTrainer

__all__ = [
    "ConfigError",
    "checkpoint_folder",
    "latest_checkpoint",
    "load_job",
    "lora_alpha",
    "model_args",
    "resolve_checkpoint",
    "tokenizer_dir",
]

_STEP = re.compile(r"step-(\d+)")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_job(
    config_file: str | os.PathLike, overrides: Sequence[str] = ()
) -> NemotronHTrainer.Config:
    """The job's config: ``config_file`` then ``overrides`` (TorchTitan's
    ``--section.field VALUE`` flags, as ``run_train.sh`` takes them). Raises
    ``ConfigError`` (one line naming file, key and value) for a bad job."""
    if any(a in ("-h", "--help") for a in overrides):
        raise ConfigError(f"{config_file}: --help is not an override")
    config, _ = _load_job(os.fspath(config_file), list(overrides))
    if config.model_spec is None or config.model_spec.name != "nemotron3":
        name = None if config.model_spec is None else config.model_spec.name
        raise ConfigError(f"{config_file}: model_spec {name!r} is not a NemotronH model")
    return config


def checkpoint_folder(config) -> Path:
    """Where the job writes its ``step-N`` checkpoints (TorchTitan's
    ``dump_folder / checkpoint.folder``)."""
    return Path(config.dump_folder) / config.checkpoint.folder


def latest_checkpoint(config) -> Path | None:
    """The job's newest complete DCP checkpoint: the ``step-N`` folder of largest N
    holding DCP's ``.metadata`` (written last, so a folder without it is an
    interrupted save, or a ``last_save_in_hf`` safetensors export); None if none."""
    folder = checkpoint_folder(config)
    if not folder.is_dir():
        return None
    steps = [
        (int(m.group(1)), d)
        for d in folder.iterdir()
        if (m := _STEP.fullmatch(d.name)) and (d / ".metadata").is_file()
    ]
    return max(steps)[1] if steps else None


def resolve_checkpoint(config, checkpoint: str | os.PathLike | None) -> str:
    """``checkpoint`` if given, else the job's newest complete checkpoint; a
    one-line ``FileNotFoundError`` naming the folder when there is none."""
    if checkpoint is not None:
        return os.fspath(checkpoint)
    found = latest_checkpoint(config)
    if found is None:
        raise FileNotFoundError(
            f"no complete checkpoint (step-N/.metadata) in {checkpoint_folder(config)}:"
            " train with --checkpoint.enable, or pass --checkpoint DIR"
        )
    return str(found)


def tokenizer_dir(config) -> str | None:
    """The job's ``hf_assets_path`` when it holds a tokenizer (and with it the chat
    template the run was trained with), else None."""
    path = config.hf_assets_path
    if path and any(os.path.isfile(os.path.join(path, n)) for n in _TOKENIZER_FILES):
        return path
    return None


def model_args(config):
    """``NemotronHArgs`` of the job's model (flavor plus the job's overrides)."""
    from .hf.config import args_from_model_config

    return args_from_model_config(config.model_spec.model)


def lora_alpha(config) -> float | None:
    """The job's LoRA alpha (None without a LoRA converter)."""
    from .lora.converter import adapted_fqns

    alphas = {cfg.alpha for _, cfg in adapted_fqns(config.model_spec.model)}
    if len(alphas) > 1:
        raise ConfigError(f"LoRA adapters with several alphas {sorted(alphas)}")
    return alphas.pop() if alphas else None
