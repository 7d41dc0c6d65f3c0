"""Train from a TOML job file: ``python -m torchtitan_nemotron3.train``.

Usage (normally through ``torchrun``, see ``run_train.sh``)::

    python -m torchtitan_nemotron3.train --config_file X.toml [--section.field VALUE ...]
        [--print_config] [--help]

The job file and the flags become TorchTitan's own command line (see
:mod:`toml_config`); ``--config_file`` may be left out when ``--config fn`` (and
``--module M``) are given. ``--help`` lists every field of the job's config;
``--print_config`` prints the resolved config and exits without training. A bad job
is one logged line and exit code 2, before any process group exists. Then this runs
exactly what ``torchtitan/train.py``'s ``main()`` runs (structured logger,
``config.build()``, ``train()`` or seed checkpoint, ``close()``, process group
teardown). Without CUDA, the CPU shims of :mod:`cpu_compat` are applied to the
process (before TorchTitan resolves its device) and to the config.
"""

from __future__ import annotations

import json
import os
import re
import sys

USAGE = (
    "usage: python -m torchtitan_nemotron3.train --config_file FILE.toml "
    "[--section.field VALUE ...] [--print_config] [--help]"
)


def _pop_option(args: list[str], name: str) -> str | None:
    """Remove ``name X`` / ``name=X`` from ``args``; return X (last one wins)."""
    value = None
    for i, arg in reversed(list(enumerate(args))):
        if arg.startswith(name + "="):
            value = value or args.pop(i).split("=", 1)[1]
        elif arg == name and i + 1 < len(args):
            value = value or args.pop(i + 1)
            args.pop(i)
    return value


def check_config(config, source_of) -> None:
    """Config-time checks of what TorchTitan would find only once process groups
    exist (``source_of(key)``: where a field was set); raise ``ConfigError``."""
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from torchtitan.hf_datasets.text_datasets import DATASETS, HuggingFaceTextDataLoader

    from torchtitan_nemotron3.train.toml_config import ConfigError

    if config.model_spec is not None and config.model_spec.name == "nemotron3":
        from torchtitan_nemotron3.sharding import check_parallelism

        try:
            world = os.environ.get("WORLD_SIZE")
            check_parallelism(
                config.parallelism,
                config.model_spec.model,
                world_size=None if world is None else int(world),
                seq_len=config.training.seq_len,
            )
        except ValueError as e:
            key = re.findall(r"(?:parallelism|training)\.\w+", str(e)) or ["parallelism"]
            raise ConfigError(f"{source_of(key[0])}: {e}") from None
    _check_dcp_checkpoint(config, source_of)
    loaders = {"dataloader": config.dataloader}
    if config.validator.enable:
        loaders["validator.dataloader"] = config.validator.dataloader
    for key, loader in loaders.items():
        if getattr(loader, "blend", None) is not None:  # the pretraining loader
            from torchtitan_nemotron3.data.sources import check_blend_files

            sets = getattr(config.validator, "sets", []) if key != "dataloader" else []
            blends = [(key + ".blend", loader.blend)] if loader.blend or not sets else []
            blends += [("validator.sets", s.partition("=")[2]) for s in sets]
            for field_key, blend in blends:
                try:
                    check_blend_files(blend, key=field_key)
                except ValueError as e:
                    raise ConfigError(f"{source_of(field_key)}: {e}") from None
            continue
        name = getattr(loader, "dataset", "").lower()
        if (
            isinstance(loader, HuggingFaceTextDataLoader.Config)
            and name not in DATASETS
        ):
            raise ConfigError(
                f"{source_of(key + '.dataset')}: {key}.dataset = {loader.dataset!r}: "
                f"unknown dataset; TorchTitan knows {', '.join(DATASETS)} "
                f"({key}.dataset_path only says where to read one of these from)"
            )
    path = config.hf_assets_path
    if isinstance(config.tokenizer, HuggingFaceTokenizer.Config) and os.path.isdir(path):
        from torchtitan_nemotron3.hf.files import check_tokenizer_files

        try:
            check_tokenizer_files(path)
        except ValueError as e:
            raise ConfigError(f"{source_of('hf_assets_path')}: {e}") from None
    names = ("tokenizer.json", "tokenizer_config.json")
    if isinstance(config.tokenizer, HuggingFaceTokenizer.Config) and not any(
        os.path.isfile(os.path.join(path, n)) for n in names
    ):
        repo = os.path.basename(os.path.normpath(path))
        repo = f"nvidia/{repo}" if "nemotron" in repo.lower() else f"<org>/{repo}"
        local_dir = os.path.relpath(os.path.dirname(os.path.abspath(path)))
        raise ConfigError(
            f"{source_of('hf_assets_path')}: hf_assets_path = {path!r}: no tokenizer "
            f"({' or '.join(names)}); download it with: python "
            f"scripts/download_hf_assets.py --repo_id {repo} --local_dir "
            f"{local_dir if local_dir.startswith('.') else './' + local_dir} "
            "--assets tokenizer config"
        )


def _check_dcp_checkpoint(config, source_of) -> None:
    """The DCP checkpoint TorchTitan will load (the latest ``step-N`` under the
    run's checkpoint folder, else ``initial_load_path`` when not in HF format),
    if written before Mamba2's ``in_proj``/``conv1d`` were split per part: one
    line with the conversion command instead of DCP's missing-key error."""
    from torchtitan_nemotron3.hf.dcp_convert import check_dcp_layout
    from torchtitan_nemotron3.train.toml_config import ConfigError

    ckpt = config.checkpoint
    if not ckpt.enable:
        return
    folder, key = os.path.join(config.dump_folder, ckpt.folder), "checkpoint.folder"
    steps = sorted(
        (int(m.group(1)), os.path.join(folder, d))
        for d in (os.listdir(folder) if os.path.isdir(folder) else [])
        if (m := re.fullmatch(r"step-(\d+)", d))
        and os.path.isfile(os.path.join(folder, d, ".metadata"))
    )
    if ckpt.load_step >= 0:
        steps = [s for s in steps if s[0] == ckpt.load_step]
    if steps:
        path = steps[-1][1]
    elif ckpt.initial_load_path and not ckpt.initial_load_in_hf:
        path, key = ckpt.initial_load_path, "checkpoint.initial_load_path"
        if not os.path.isfile(os.path.join(path, ".metadata")):
            return
    else:
        return
    try:
        check_dcp_layout(path)
    except ValueError as e:
        raise ConfigError(f"{source_of(key)}: {e}") from None
    if (
        key == "checkpoint.folder"
        and getattr(config.dataloader, "blend", None)
        and "dataloader" not in ckpt.exclude_from_loading
    ):
        from torchtitan_nemotron3.data.pretrain import check_checkpoint_data

        try:  # a resume on other data: refused here, not in every rank
            check_checkpoint_data(config, path)
        except ValueError as e:
            raise ConfigError(f"{source_of('dataloader')}: {path}: {e}") from None


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    config_file = _pop_option(args, "--config_file")
    print_config = "--print_config" in args
    args = [a for a in args if a != "--print_config"]
    if "-h" in args or "--help" in args:
        print(USAGE)
        if config_file is None and "--config" not in args:
            return
    elif config_file is None and not any(
        a.split("=")[0] in ("--config", "--job.config") for a in args
    ):
        print(f"error: --config_file is required\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)

    # Before anything builds Trainer components: TorchTitan resolves its device
    # type when `torchtitan.tools.utils` is imported.
    from torchtitan_nemotron3.train import cpu_compat

    cpu_compat.apply()

    import torch
    import torchtitan
    from torchtitan.observability import structured_logger as sl
    from torchtitan.tools.logging import init_logger, logger

    from torchtitan_nemotron3.train.toml_config import ConfigError, load_job

    init_logger()
    if print_config:  # stdout carries the config alone
        for handler in logger.handlers:
            handler.setStream(sys.stderr)
    logger.info(f"torchtitan version: {torchtitan.__version__}")
    if cpu_compat.applied():
        logger.info(f"[cpu_compat] process shims: {', '.join(cpu_compat.applied())}")

    try:
        config, source_of = load_job(config_file, args)
        cpu_compat.adjust_config_for_cpu(config)
        check_config(config, source_of)
    except ConfigError as e:
        # A bad job is the user's to fix: one line naming it, no traceback.
        logger.error(f"error: {e}")
        raise SystemExit(2) from None
    logger.info(
        f"Loaded {config_file or 'no job file'} (overrides: {' '.join(args) or 'none'})"
    )
    if print_config:
        print(json.dumps(config.to_dict(), indent=2, default=str))
        return

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
    try:
        main()
    except Exception as error:  # under torchrun: one line; the launcher names the cause
        from torchtitan_nemotron3.resilience.failure import report_rank_failure

        if not report_rank_failure(error):
            raise
        raise SystemExit(1) from None
