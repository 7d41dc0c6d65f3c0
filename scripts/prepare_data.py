#!/usr/bin/env python
"""Tokenize a corpus offline into Megatron's indexed format (.bin + .idx + manifest),
the pre-tokenized input of continued pretraining::

    python scripts/prepare_data.py data/web/*.jsonl --tokenizer assets/hf/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 \\
        --output_prefix data/web_text_document --workers 16

    python scripts/prepare_data.py allenai/c4 --hub_config en --split validation \\
        --config_file train_configs/nemotron3-nano-30B.toml --output_prefix data/c4_valid

Inputs: .jsonl/.json/.parquet/.txt files, directories, globs, or a hub dataset id.
The tokenizer is ``--tokenizer DIR`` (tokenizer.json + tokenizer_config.json) or the
``hf_assets_path`` of ``--config_file`` (a job file, read as run_train.sh reads it:
the debug jobs give the generated debug tokenizer). Documents end with the tokenizer's EOS (``--add_bos``: also
start with BOS). Bad rows stop the run with one line naming file and row, unless
``--skip_bad_rows`` (counted, reported, recorded in the manifest). See
``torchtitan_nemotron3/data/prepare.py``.
"""

import argparse
import os
import sys

from torchtitan_nemotron3.data.indexed import DataFileError
from torchtitan_nemotron3.data.prepare import prepare


def tokenizer_from_job_file(path: str) -> str:
    """The ``hf_assets_path`` a job file gives the trainer (read through the same
    TOML layer as run_train.sh: the debug jobs get the generated debug tokenizer)."""
    from torchtitan_nemotron3.train.toml_config import ConfigError, load_job

    try:
        config, _ = load_job(path, [])
    except (ConfigError, OSError) as e:
        raise DataFileError(f"{path}: cannot read the job file ({e})") from None
    return os.path.abspath(os.path.expanduser(config.hf_assets_path))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Tokenize a corpus into Megatron's indexed dataset format.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", help="files, directories, globs, or a hub dataset id")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="folder with tokenizer.json (+ tokenizer_config.json)")
    tok.add_argument("--config_file", help="a job file: its hf_assets_path is the tokenizer")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--output_prefix", help="writes PREFIX.bin, PREFIX.idx, PREFIX.manifest.json")
    out.add_argument("--output_dir", help="with --name: the prefix is OUTPUT_DIR/NAME")
    p.add_argument("--name", help="file name stem in --output_dir")
    p.add_argument("--text_key", default="text", help="the text field of each row")
    p.add_argument("--add_bos", action="store_true", help="start each document with BOS")
    p.add_argument("--eos_token", help="the token ending each document (default: tokenizer_config.json's eos_token)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--chunk_docs", type=int, default=256, help="documents per encode_batch call")
    p.add_argument("--hub_config", help="hub datasets: the configuration (subset) name")
    p.add_argument("--split", default="train", help="hub datasets: the split")
    p.add_argument("--skip_bad_rows", action="store_true", help="count and report bad rows instead of stopping")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.output_dir is not None and not args.name:
        p.error("--output_dir needs --name")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        tokenizer = args.tokenizer or tokenizer_from_job_file(args.config_file)
        prefix = args.output_prefix or os.path.join(args.output_dir, args.name)
        result = prepare(
            args.inputs,
            tokenizer,
            prefix,
            text_key=args.text_key,
            add_bos=args.add_bos,
            eos_token=args.eos_token,
            workers=args.workers,
            chunk_docs=args.chunk_docs,
            hub_config=args.hub_config,
            split=args.split,
            skip_bad_rows=args.skip_bad_rows,
            progress=not args.no_progress,
        )
    except DataFileError as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    m = result.manifest
    print(
        f"{result.prefix}.bin/.idx: {result.documents:,} documents, {result.tokens:,} tokens "
        f"({m['dtype']}) in {result.seconds:.1f} s: {result.tokens_per_second:,.0f} tokens/s "
        f"with {args.workers} worker(s)"
    )
    if result.bad_rows:
        print(f"skipped {result.bad_rows} bad rows:", file=sys.stderr)
        for reason, where in m["bad_rows"]["examples"].items():
            print(f"  {reason}: e.g. {'; '.join(where)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
