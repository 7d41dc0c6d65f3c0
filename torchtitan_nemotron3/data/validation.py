"""Named validation sets: TorchTitan's ``Validator`` run once per set, each set's
loss logged as ``validation/<name>/loss``.

``[validator] sets = ["web=data/web_valid_text_document", "code=data/code_valid_text_document"]``:
each entry is ``name=<blend>``, read by ``validator.dataloader`` (a
``PretrainDataLoader.Config``) with its ``blend`` replaced. TorchTitan's validator
rebuilds its loader on every call, so each evaluation reads the same rows (the
first ``steps`` batches of each set). With a held-out fraction, the validator's
dataloader has ``split = "valid"`` and the training loader's ``valid_fraction``,
so it reads exactly the documents training leaves out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from torchtitan.components.validate import Validator
from torchtitan.tools.logging import logger

from .blend import parse_blend


class _NamedMetrics:
    """The metrics processor seen by one set's pass: its validation loss goes out
    under the set's name; everything else is the real processor's."""

    def __init__(self, real, name: str):
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_name", name)

    def __getattr__(self, key):
        return getattr(self._real, key)

    def __setattr__(self, key, value):
        setattr(self._real, key, value)

    def log_validation(self, loss: float, step: int, extra_metrics=None):
        """TorchTitan's ``log_validation`` under the set's name: loss and tokens/s
        per device, then its counters reset (the next training line's tokens/s
        does not count validation)."""
        real = self._real
        elapsed = time.perf_counter() - real.time_last_log
        tps = real.ntokens_since_last_log / (
            max(elapsed, 1e-9) * real.parallel_dims.non_data_parallel_size
        )
        metrics = {
            f"validation/{self._name}/loss": loss,
            f"validation/{self._name}/throughput(tps)": tps,
            **(extra_metrics or {}),
        }
        real.logger.log(metrics, step)
        logger.info(
            f"validate step: {step:2}  {self._name} loss: {loss:7.4f}  tps: {round(tps):,}"
        )
        real.ntokens_since_last_log = 0
        real.time_last_log = time.perf_counter()
        real.device_memory_monitor.reset_peak_stats()


def parse_sets(sets: list[str]) -> list[tuple[str, str]]:
    out = []
    for entry in sets:
        name, sep, blend = entry.partition("=")
        name = name.strip()
        if not sep or not name or not blend.strip():
            raise ValueError(
                f"validator.sets: {entry!r} is not 'name=<prefix or blend>'"
            )
        parse_blend(blend, key=f"validator.sets[{name}]")
        if name in [n for n, _ in out]:
            raise ValueError(f"validator.sets: name {name!r} used twice")
        out.append((name, blend.strip()))
    return out


class NamedSetsValidator(Validator):
    """TorchTitan's ``Validator`` over several named sets (or its one dataloader)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Validator.Config):
        sets: list[str] = field(default_factory=list)
        """``name=<blend>`` per set (the blend as ``dataloader.blend``); empty:
        ``validator.dataloader`` as it is, logged as TorchTitan does."""

        def __post_init__(self):
            Validator.Config.__post_init__(self)
            parse_sets(self.sets)

    def __init__(self, config: Config, **kwargs):
        super().__init__(config, **kwargs)
        self.sets = parse_sets(config.sets)

    def validate(self, model_parts, step: int) -> None:
        if not self.sets:
            return super().validate(model_parts, step)
        base, real = self.dl_config, self.metrics_processor
        try:
            for name, blend in self.sets:
                self.dl_config = replace(base, blend=blend)
                self.metrics_processor = _NamedMetrics(real, name)
                super().validate(model_parts, step)
        finally:
            self.dl_config, self.metrics_processor = base, real


def link_to_training(train_loader, validator) -> None:
    """A validator whose dataloader is a pretraining loader with no blend and no
    ``sets`` validates on the training blend's held-out documents: it takes the
    training blend and ``valid_fraction`` (refused when nothing is held out:
    validating on training documents would measure nothing)."""
    from .pretrain import PretrainDataLoader

    loader = getattr(validator, "dataloader", None)
    if not (
        getattr(validator, "enable", False)
        and isinstance(loader, PretrainDataLoader.Config)
        and isinstance(train_loader, PretrainDataLoader.Config)
    ):
        return
    if loader.valid_fraction == 0 and train_loader.valid_fraction > 0:
        loader.valid_fraction = train_loader.valid_fraction
        loader.seed = train_loader.seed
    if not loader.blend and not getattr(validator, "sets", None):
        if loader.valid_fraction == 0 or loader.split != "valid":
            raise ValueError(
                "validator: no held-out data; set validator.sets (name=<prefix>) or "
                "dataloader.valid_fraction (documents held out of the training blend)"
            )
        loader.blend = train_loader.blend
