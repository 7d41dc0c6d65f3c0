#!/usr/bin/env python
"""Convert NemotronH checkpoints between TorchTitan DCP and Hugging Face safetensors.

DCP → HF: a training checkpoint (``<dump_folder>/checkpoint/step-N``, written every
``checkpoint.interval`` steps) to a directory transformers loads. With the job file
the run was trained from (``--config_file``, followed by the overrides the run took)
nothing else is needed: the architecture, the LoRA settings and the tokenizer / chat
template (``hf_assets_path``) are the job's, and without DCP_DIR the job's newest
complete checkpoint is converted::

    ./run_train.sh --checkpoint.enable      # outputs/debug/checkpoint/step-{10,20}
    python scripts/convert_checkpoint.py dcp-to-hf out/hf \\
        --config_file train_configs/debug_model.toml

    python scripts/convert_checkpoint.py dcp-to-hf outputs/nano-30B/checkpoint/step-500 \\
        out/hf --config_file train_configs/nemotron3-nano-30B.toml --dtype bfloat16

Without a job file, a DCP checkpoint records no architecture: give ``--flavor`` (a
name from ``torchtitan_nemotron3.model.FLAVORS``), ``--config_json`` (an HF
config.json, or a directory holding one) or ``--config`` (the run's config function
in ``torchtitan_nemotron3.config_registry``); ``--flavor``/``--config_json`` also
override the job's. ``--assets_dir`` (a directory or Hub repo id; default: the
job's ``hf_assets_path``) supplies the tokenizer, chat template and
generation_config.json, copied where present.

LoRA runs: their checkpoints hold the adapters (``<module>.lora_a.weight`` /
``lora_b.weight``) beside the frozen base. dcp-to-hf writes each adapted weight
merged, ``W + alpha/r·B·A``: full weights that vLLM and transformers load (vLLM
cannot serve LoRA on MoE models' experts). The checkpoint records no alpha: the
job file (or the run's ``--config``) has rank, alpha and targets; with
``--flavor``/``--config_json`` give ``--lora_alpha`` (targets and rank are read from
the adapters). ``--adapters_only`` writes the adapters alone in PEFT's format
(adapter_config.json + adapter_model.safetensors) instead::

    CONFIG_FILE=train_configs/debug_lora.toml ./run_train.sh
    python scripts/convert_checkpoint.py dcp-to-hf out/hf \\
        --config_file train_configs/debug_lora.toml
    python scripts/convert_checkpoint.py dcp-to-hf out/peft \\
        --config_file train_configs/debug_lora.toml --adapters_only --mamba_out_proj

QLoRA runs (and any adapters-only checkpoint): ``--merge_into_base HF_DIR`` merges
the adapters into the bf16 HF base (a QLoRA job file defaults to its
``initial_load_path``) and reports the share of LoRA deltas the bf16 rounding erases
(``--dtype float32`` keeps them all)::

    python scripts/convert_checkpoint.py dcp-to-hf out/hf --config_file train_configs/debug_qlora.toml

PEFT refuses LoRA on Mamba ``out_proj``, one of the default targets:
``--adapters_only`` then stops with that message unless ``--mamba_out_proj`` (a run
trained with ``lora.converter.PEFT_TARGET_MODULES`` exports as is).

HF export of the last step: with ``checkpoint.last_save_in_hf`` (the Nano config)
the final step (``step-1000``) is already safetensors, without config.json or
tokenizer; ``hf-config`` checks the tensors and adds them::

    python scripts/convert_checkpoint.py hf-config outputs/nano-30B/checkpoint/step-1000 \\
        --config_file train_configs/nemotron3-nano-30B.toml

HF → DCP (for ``checkpoint.initial_load_path`` without ``initial_load_in_hf``)::

    python scripts/convert_checkpoint.py hf-to-dcp path/to/hf_dir out/dcp [--dtype float32]

dcp-to-hf and hf-to-dcp write into a temporary sibling and rename it into place,
so an interrupted conversion never leaves a directory that looks complete.
"""

import argparse
import sys

import torch


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}")
    return dtype


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = parser.add_subparsers(dest="direction", required=True)

    to_hf = sub.add_parser(
        "dcp-to-hf", help="TorchTitan DCP checkpoint → HF safetensors"
    )
    to_hf.add_argument(
        "dcp_dir",
        nargs="?",
        help="e.g. outputs/debug/checkpoint/step-20 (default with --config_file: "
        "the job's newest complete checkpoint)",
    )
    to_hf.add_argument("out_dir")
    to_hf.add_argument(
        "--dtype",
        type=_dtype,
        default=None,
        help="cast floating tensors (default: as stored; the router stays fp32)",
    )
    to_hf.add_argument("--max_shard_size", default="5GB")
    to_hf.add_argument(
        "--lora_alpha",
        type=float,
        help="LoRA alpha of the run (with --flavor/--config_json; --config has it)",
    )
    to_hf.add_argument(
        "--adapters_only",
        action="store_true",
        help="LoRA: write the adapters alone in PEFT's format, not merged weights",
    )
    to_hf.add_argument(
        "--base_model", help="--adapters_only: recorded as base_model_name_or_path"
    )
    to_hf.add_argument(
        "--merge_into_base",
        metavar="HF_DIR",
        help="LoRA: merge the adapters into the HF base at HF_DIR (the usual QLoRA "
        "export: the bf16 release, not the NF4 copy the run trained on); --dtype "
        "bfloat16 (default) or float32; reports the share of LoRA deltas the bf16 "
        "rounding erases. A QLoRA job (--config_file) defaults to its "
        "checkpoint.initial_load_path: its checkpoints hold the adapters only",
    )
    to_hf.add_argument(
        "--mamba_out_proj",
        action="store_true",
        help="--adapters_only: write Mamba out_proj adapters although PEFT refuses them",
    )

    to_dcp = sub.add_parser(
        "hf-to-dcp", help="HF safetensors → TorchTitan DCP checkpoint"
    )
    to_dcp.add_argument("hf_dir", help="a directory or a Hub repo id")
    to_dcp.add_argument("out_dir")
    to_dcp.add_argument(
        "--dtype",
        type=_dtype,
        default=None,
        help="cast floating tensors (default: as stored)",
    )
    for p in (to_hf, to_dcp):
        p.add_argument("--no_progress", action="store_true", help="no progress bar")

    config = sub.add_parser(
        "hf-config",
        help="add config.json and tokenizer files to a TorchTitan HF export",
    )
    config.add_argument("hf_dir")
    config.add_argument(
        "--dtype",
        type=_dtype,
        default=None,
        help="dtype recorded in config.json (default: lm_head's)",
    )
    for p in (to_hf, config):
        p.add_argument(
            "--config_file",
            help="the training job (train_configs/*.toml; its --section.field VALUE "
            "overrides may follow): architecture, LoRA settings, assets; "
            "--flavor/--config_json/--assets_dir override it",
        )
        arch = p.add_mutually_exclusive_group()
        arch.add_argument(
            "--flavor", help="model flavor the checkpoint was trained with"
        )
        arch.add_argument(
            "--config_json", help="HF config.json (file or its directory)"
        )
        arch.add_argument(
            "--config",
            help="the run's config function (torchtitan_nemotron3.config_registry)",
        )
        p.add_argument(
            "--assets_dir",
            help="directory or Hub repo id with tokenizer / chat template / "
            "generation_config.json files to copy",
        )
    return parser


def _apply_job(opts) -> None:
    """Fill what ``--config_file`` knows and the command line left out: the
    checkpoint (the job's newest complete one), assets (``hf_assets_path``), the
    LoRA alpha, and the run's model config (``opts.job_model``)."""
    opts.job_model = None
    if not getattr(opts, "config_file", None):
        if getattr(opts, "dcp_dir", "") is None:
            raise ValueError("dcp-to-hf: give DCP_DIR OUT_DIR, or --config_file JOB")
        if not (opts.flavor or opts.config_json or opts.config):
            raise ValueError(
                "give the architecture: --config_file, --flavor, --config_json or "
                "--config"
            )
        return
    from torchtitan_nemotron3 import job as job_file

    if opts.config:
        raise ValueError("--config and --config_file: give one")
    job = job_file.load_job(opts.config_file, opts.overrides)
    if getattr(opts, "dcp_dir", "") is None:
        opts.dcp_dir = job_file.resolve_checkpoint(job, None)
        print(f"checkpoint: {opts.dcp_dir}")
    if opts.assets_dir is None:
        opts.assets_dir = job_file.tokenizer_dir(job)
    if opts.flavor or opts.config_json:  # the architecture overridden: no run tree
        if getattr(opts, "lora_alpha", None) is None and hasattr(opts, "lora_alpha"):
            opts.lora_alpha = job_file.lora_alpha(job)
    else:
        opts.job_model = job.model_spec.model
    opts.initial_load_path = job.checkpoint.initial_load_path or None


def _model_config(opts):
    """(NemotronHArgs, the run's model config tree or None) from --flavor,
    --config_json, the job file or --config (the tree carries the LoRA converter,
    if any)."""
    from torchtitan_nemotron3.hf.config import (
        args_from_hf_config,
        args_from_model_config,
    )
    from torchtitan_nemotron3.model import flavor_args

    if opts.job_model is not None:
        return args_from_model_config(opts.job_model), opts.job_model
    if opts.flavor:
        return flavor_args(opts.flavor), None
    if opts.config_json:
        return args_from_hf_config(opts.config_json), None
    from torchtitan_nemotron3 import config_registry

    fn = getattr(config_registry, opts.config, None)
    if fn is None or not callable(fn):
        raise ValueError(
            f"--config {opts.config}: no such config function in "
            "torchtitan_nemotron3.config_registry"
        )
    model_config = fn().model_spec.model
    return args_from_model_config(model_config), model_config


def _lora_model_config(opts, args, run_config):
    """The LoRA config tree to merge with (None for a checkpoint without adapters);
    refuses a LoRA setting that does not fit the checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    from torchtitan_nemotron3.lora.converter import lora_scalings
    from torchtitan_nemotron3.lora.export import lora_config_for_dcp
    from torchtitan_nemotron3.lora.merge import is_adapter_key
    from torchtitan_nemotron3.model import build_model_config

    stored = FileSystemReader(opts.dcp_dir).read_metadata().state_dict_metadata
    has_adapters = any(is_adapter_key(k) for k in stored)
    run_lora = run_config is not None and bool(lora_scalings(run_config))
    run_name = f"--config_file {opts.config_file}" if opts.config_file else (
        f"--config {opts.config}"
    )
    if opts.lora_alpha is not None and run_config is not None:
        raise ValueError(
            "--lora_alpha goes with --flavor/--config_json; "
            f"{run_name.split()[0]} gives the run's own LoRA settings"
        )
    if not has_adapters:
        if opts.adapters_only or opts.lora_alpha is not None or run_lora:
            raise ValueError(
                f"{opts.dcp_dir} holds no LoRA adapters (no *.lora_a.weight / "
                "*.lora_b.weight tensors): not a LoRA run's checkpoint"
            )
        return None
    if run_config is not None:
        if not run_lora:
            raise ValueError(
                f"{opts.dcp_dir} holds LoRA adapters but {run_name} "
                "has no LoRA converter: give the LoRA run's job or config function"
            )
        return run_config
    if opts.lora_alpha is None:
        raise ValueError(
            f"{opts.dcp_dir} holds LoRA adapters and the checkpoint records no "
            "alpha: give --lora_alpha ALPHA (the run's) or --config RUN_CONFIG"
        )
    return lora_config_for_dcp(opts.dcp_dir, build_model_config(args), opts.lora_alpha)


def _merge_into_base(opts, args, lora_config) -> int:
    """An adapters-only checkpoint (QLoRA) merged into the HF base
    (``lora.serve.export_merged``), plus config.json."""
    from torchtitan_nemotron3.hf.dcp_convert import add_hf_config
    from torchtitan_nemotron3.lora.serve import export_merged

    base = opts.merge_into_base or getattr(opts, "initial_load_path", None)
    if not base:
        raise ValueError(
            "--merge_into_base HF_DIR: the HF base the adapters were trained on "
            "(the job's checkpoint.initial_load_path is not set)"
        )
    if lora_config is None:
        raise ValueError(f"--merge_into_base: {opts.dcp_dir} holds no LoRA adapters")
    dtype = opts.dtype or torch.bfloat16
    report = export_merged(
        opts.dcp_dir, base, opts.out_dir, lora_config, dtype=dtype,
        assets_dir=opts.assets_dir or base,
    )  # fmt: skip
    add_hf_config(opts.out_dir, args, dtype)
    print(
        f"wrote {opts.out_dir} (LoRA adapters merged into {base}, {dtype}; "
        f"{100 * report.erased_share:.2f}% of the LoRA deltas erased by the rounding)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    opts, opts.overrides = parser.parse_known_args(argv)
    if opts.overrides and not (
        getattr(opts, "config_file", None) and opts.overrides[0].startswith("--")
    ):
        parser.error(f"unrecognized arguments: {' '.join(opts.overrides)}")
    from torchtitan_nemotron3.hf.dcp_convert import add_hf_config, dcp_to_hf, hf_to_dcp

    if opts.direction == "hf-to-dcp":
        hf_to_dcp(
            opts.hf_dir, opts.out_dir, dtype=opts.dtype, progress=not opts.no_progress
        )
        print(f"wrote {opts.out_dir}")
        return 0
    _apply_job(opts)
    args, run_config = _model_config(opts)
    if opts.direction == "hf-config":
        add_hf_config(opts.hf_dir, args, opts.dtype, assets_dir=opts.assets_dir)
        print(f"wrote {opts.hf_dir}/config.json")
        return 0
    if not opts.adapters_only and (opts.base_model or opts.mamba_out_proj):
        raise ValueError("--base_model and --mamba_out_proj go with --adapters_only")
    lora_config = _lora_model_config(opts, args, run_config)
    if opts.merge_into_base or getattr(run_config, "base_dtype", None) == "nf4":
        return _merge_into_base(opts, args, lora_config)
    if opts.adapters_only:
        from torchtitan_nemotron3.lora.export import load_lora_adapters
        from torchtitan_nemotron3.lora.peft import save_peft_adapters

        save_peft_adapters(
            load_lora_adapters(opts.dcp_dir, lora_config),
            opts.out_dir,
            lora_config,
            base_model_name_or_path=opts.base_model,
            dtype=opts.dtype,
            mamba_out_proj=opts.mamba_out_proj,
        )
        print(f"wrote {opts.out_dir} (LoRA adapters, PEFT format)")
        return 0
    dcp_to_hf(
        opts.dcp_dir,
        opts.out_dir,
        args,
        dtype=opts.dtype,
        max_shard_size=opts.max_shard_size,
        progress=not opts.no_progress,
        assets_dir=opts.assets_dir,
        lora_model_config=lora_config,
    )
    merged = " (LoRA adapters merged)" if lora_config is not None else ""
    print(f"wrote {opts.out_dir}{merged}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        # Bad paths, configs and checkpoints (our errors are ValueErrors): one
        # line naming the file, not a traceback.
        print(f"convert_checkpoint.py: error: {e}", file=sys.stderr)
        sys.exit(1)
