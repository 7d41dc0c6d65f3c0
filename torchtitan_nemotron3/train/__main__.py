"""Train from a TOML job file: ``python -m torchtitan_nemotron3.train``.

Usage (normally through ``torchrun``, see ``run_train.sh``)::

    python -m torchtitan_nemotron3.train --config_file X.toml [--section.field VALUE ...]

Builds the ``Trainer.Config`` with :func:`toml_config.load_toml_config` and then
runs exactly what ``torchtitan/train.py``'s ``main()`` runs (logger, structured
logger, ``config.build()``, ``train()`` or seed checkpoint, ``close()``, process
group teardown). Without CUDA, the CPU shims of :mod:`cpu_compat` are applied to
the process and the config first.
"""

from __future__ import annotations

import os
import sys

USAGE = (
    "usage: python -m torchtitan_nemotron3.train --config_file FILE.toml "
    "[--section.field VALUE ...]"
)


def split_config_file(args: list[str]) -> tuple[str, list[str]]:
    """Extract ``--config_file X`` / ``--config_file=X``; return it and the rest."""
    config_file = None
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--config_file="):
            config_file = arg.split("=", 1)[1]
        elif arg == "--config_file":
            if i + 1 >= len(args):
                raise SystemExit(f"--config_file requires a value\n{USAGE}")
            config_file = args[i + 1]
            i += 1
        else:
            rest.append(arg)
        i += 1
    if not config_file:
        raise SystemExit(f"--config_file is required\n{USAGE}")
    return config_file, rest


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if "-h" in args or "--help" in args:
        print(USAGE)
        print(__doc__)
        return
    config_file, overrides = split_config_file(args)

    # Before anything builds Trainer components: TorchTitan resolves its device
    # type when `torchtitan.tools.utils` is imported.
    from torchtitan_nemotron3.train import cpu_compat

    cpu_compat.apply()

    import torch
    import torchtitan
    from torchtitan.observability import structured_logger as sl
    from torchtitan.tools.logging import init_logger, logger

    from torchtitan_nemotron3.train.toml_config import ConfigError, load_toml_config

    init_logger()
    logger.info(f"torchtitan version: {torchtitan.__version__}")
    if cpu_compat.applied():
        logger.info(f"[cpu_compat] process shims: {', '.join(cpu_compat.applied())}")

    try:
        config = load_toml_config(config_file, overrides)
    except (ConfigError, FileNotFoundError) as e:
        # A bad job file is the user's to fix: one line naming it, no traceback.
        logger.error(f"error: {e}")
        raise SystemExit(2) from None
    logger.info(f"Loaded {config_file} (overrides: {' '.join(overrides) or 'none'})")
    cpu_compat.adjust_config_for_cpu(config)

    # NOTE: internal meta tooling relies on source="training" (as in train.py).
    sl.init_structured_logger(
        source="training",
        output_dir=config.dump_folder,
        enable=config.debug.enable_structured_logging,
    )
    sl.log_trace_instant("structured_logger_started")

    trainer = None
    try:
        if config.comm.mode == "local_tensor":
            logger.info("Local tensor mode enabled - skipping training execution")
            return

        trainer = config.build()

        if config.checkpoint.create_seed_checkpoint:
            assert int(os.environ["WORLD_SIZE"]) == 1, (
                "Must create seed checkpoint using a single device, to disable sharding."
            )
            assert config.checkpoint.enable, (
                "Must enable checkpointing when creating a seed checkpoint."
            )
            trainer.checkpointer.save(curr_step=0, last_step=True)
            logger.info("Created seed checkpoint")
        else:
            trainer.train()
    except Exception:
        if trainer:
            trainer.close()
        raise
    else:
        trainer.close()
        if torch.distributed.is_initialized():
            with sl.log_trace_span("torch_distributed_teardown"):
                torch.distributed.destroy_process_group()
        logger.info("Process group destroyed")


if __name__ == "__main__":
    main()
