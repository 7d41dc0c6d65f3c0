#!/usr/bin/env python
"""Export a LoRA run's DCP checkpoint: merged full weights, or the adapters alone.

TorchTitan's ``checkpoint.last_save_in_hf`` already writes the last step merged;
this is for the interval checkpoints (``<dump_folder>/checkpoint/step-N``, model
under our names, adapters included). The checkpoint records no LoRA settings:
``--config`` names the run's config function (``torchtitan_nemotron3.config_registry``),
whose ``model_spec`` gives the architecture, targets, rank and alpha::

    # merged hub directory (W + alpha/r·B·A), what vLLM and transformers load
    python scripts/lora_export.py merged outputs/debug-lora/checkpoint/step-20 out/hf \\
        --config nemotron3_debug_lora --assets_dir "$TOKENIZER_DIR"
    # adapters alone, PEFT's format (adapter_config.json + adapter_model.safetensors)
    python scripts/lora_export.py peft outputs/debug-lora/checkpoint/step-20 out/peft \\
        --config nemotron3_debug_lora --base_model nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16

``merged`` loads the whole model on CPU (one fp32 model in memory), merges, then
casts to ``--dtype``; ``peft`` reads the adapters only. PEFT refuses LoRA on Mamba ``out_proj``, one of the default
targets: ``peft`` then stops with that message unless ``--mamba_out_proj`` (the
adapters of a run trained with ``lora.converter.PEFT_TARGET_MODULES`` export as is).
(``scripts/convert_checkpoint.py dcp-to-hf`` refuses a LoRA checkpoint: it
builds the plain model, which has no adapter tensors.)
"""

import argparse
import sys

import torch


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = parser.add_subparsers(dest="what", required=True)
    merged = sub.add_parser("merged", help="merged hub directory")
    peft = sub.add_parser("peft", help="adapters alone, PEFT format")
    for p in (merged, peft):
        p.add_argument("dcp_dir", help="e.g. outputs/debug-lora/checkpoint/step-20")
        p.add_argument("out_dir")
        p.add_argument("--config", required=True, help="the run's config function")
        p.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: fp32)")
    merged.add_argument("--assets_dir", help="tokenizer / chat template files to copy")
    merged.add_argument("--max_shard_size", default="5GB")
    peft.add_argument("--base_model", help="recorded as base_model_name_or_path")
    peft.add_argument(
        "--mamba_out_proj",
        action="store_true",
        help="write Mamba out_proj adapters although PEFT refuses them",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    from torchtitan_nemotron3 import config_registry
    from torchtitan_nemotron3.lora.export import dcp_to_merged_hf, load_lora_adapters
    from torchtitan_nemotron3.lora.peft import save_peft_adapters

    fn = getattr(config_registry, opts.config, None)
    if fn is None:
        raise ValueError(f"--config {opts.config}: no such config function")
    model_config = fn().model_spec.model
    dtype = getattr(torch, opts.dtype) if opts.dtype else None
    if opts.what == "merged":
        dcp_to_merged_hf(
            opts.dcp_dir,
            opts.out_dir,
            model_config,
            dtype=dtype,
            assets_dir=opts.assets_dir,
            max_shard_size=opts.max_shard_size,
        )
    else:
        save_peft_adapters(
            load_lora_adapters(opts.dcp_dir, model_config),
            opts.out_dir,
            model_config,
            base_model_name_or_path=opts.base_model,
            dtype=dtype,
            mamba_out_proj=opts.mamba_out_proj,
        )
    print(f"wrote {opts.out_dir}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"lora_export.py: error: {e}", file=sys.stderr)
        sys.exit(1)
