#!/usr/bin/env python
"""Convert NemotronH checkpoints between TorchTitan DCP and Hugging Face safetensors.

DCP → HF: a training checkpoint (``<dump_folder>/checkpoint/step-N``, written every
``checkpoint.interval`` steps) to a directory transformers loads. The debug config
saves none unless ``--checkpoint.enable`` is given::

    ./run_train.sh --checkpoint.enable      # outputs/debug/checkpoint/step-{10,20}
    TOKENIZER=$(python -c "from torchtitan_nemotron3.train.assets import ensure_debug_assets as a; print(a()[0])")
    python scripts/convert_checkpoint.py dcp-to-hf outputs/debug/checkpoint/step-20 out/hf \\
        --flavor debugmodel --assets_dir "$TOKENIZER"

    python scripts/convert_checkpoint.py dcp-to-hf outputs/nano-30B/checkpoint/step-500 out/hf \\
        --flavor nano-30B --dtype bfloat16 \\
        --assets_dir assets/hf/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16

A DCP checkpoint records no architecture: give ``--flavor`` (a name from
``torchtitan_nemotron3.model.FLAVORS``) or ``--config_json`` (an HF config.json, or
a directory holding one). ``--assets_dir`` (a directory or Hub repo id) supplies
the tokenizer, chat template and generation_config.json, copied where present.

HF export of the last step: with ``checkpoint.last_save_in_hf`` (the Nano config)
the final step (``step-1000``) is already safetensors, without config.json or
tokenizer; ``hf-config`` checks the tensors and adds them::

    python scripts/convert_checkpoint.py hf-config outputs/nano-30B/checkpoint/step-1000 \\
        --flavor nano-30B --assets_dir assets/hf/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16

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
    to_hf.add_argument("dcp_dir", help="e.g. outputs/debug/checkpoint/step-20")
    to_hf.add_argument("out_dir")
    to_hf.add_argument(
        "--dtype",
        type=_dtype,
        default=None,
        help="cast floating tensors (default: as stored; the router stays fp32)",
    )
    to_hf.add_argument("--max_shard_size", default="5GB")

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
        arch = p.add_mutually_exclusive_group(required=True)
        arch.add_argument(
            "--flavor", help="model flavor the checkpoint was trained with"
        )
        arch.add_argument(
            "--config_json", help="HF config.json (file or its directory)"
        )
        p.add_argument(
            "--assets_dir",
            help="directory or Hub repo id with tokenizer / chat template / "
            "generation_config.json files to copy",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    from torchtitan_nemotron3.hf.config import args_from_hf_config
    from torchtitan_nemotron3.hf.dcp_convert import add_hf_config, dcp_to_hf, hf_to_dcp
    from torchtitan_nemotron3.model import flavor_args

    if opts.direction == "hf-to-dcp":
        hf_to_dcp(
            opts.hf_dir, opts.out_dir, dtype=opts.dtype, progress=not opts.no_progress
        )
        print(f"wrote {opts.out_dir}")
        return 0
    args = (
        flavor_args(opts.flavor)
        if opts.flavor
        else args_from_hf_config(opts.config_json)
    )
    if opts.direction == "hf-config":
        add_hf_config(opts.hf_dir, args, opts.dtype, assets_dir=opts.assets_dir)
        print(f"wrote {opts.hf_dir}/config.json")
        return 0
    dcp_to_hf(
        opts.dcp_dir,
        opts.out_dir,
        args,
        dtype=opts.dtype,
        max_shard_size=opts.max_shard_size,
        progress=not opts.no_progress,
        assets_dir=opts.assets_dir,
    )
    print(f"wrote {opts.out_dir}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        # Bad paths, configs and checkpoints (our errors are ValueErrors): one
        # line naming the file, not a traceback.
        print(f"convert_checkpoint.py: error: {e}", file=sys.stderr)
        sys.exit(1)
