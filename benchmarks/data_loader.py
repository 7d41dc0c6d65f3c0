#!/usr/bin/env python
"""The pretraining loader's throughput per CPU core, and its share of a training step.

    python benchmarks/data_loader.py                      # 20M tokens, seq 8192
    python benchmarks/data_loader.py --tokens 50_000_000 --seq_len 8192 --rows 200

Part 1 writes a synthetic Megatron dataset (int32 ids below 131,072, the Nemotron-3
vocabulary; document lengths log-normal around ~1.5K tokens) and reads rows of
``seq_len`` through ``PretrainDataLoader`` (one rank, ``num_workers=0``: everything in
this process), timing CPU seconds of this process (``time.process_time``: per core,
whatever else the machine runs). Rows: isolated documents, the EOS-separated stream,
and a 3-source blend. Target (issue 19): ≥ 20M tokens/s per core. The step share is
the time for one local batch of 1 × seq_len against a step at 43K tokens/s/GPU
(8 ranks, each its own loader: seq_len / 43,000 s per step): target < 1%.

Part 2 compares, on the same documents (the offline debug corpus), TorchTitan
0.3.0's ``HuggingFaceTextDataLoader`` (tokenizes and packs on the fly) with this
loader reading the same corpus pre-tokenized: tokens/s per core and the ratio.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEP_TPS = 43_000  # tokens/s/GPU target (shared/docs/performance.md)


def write_synthetic(prefix: str, tokens: int, seed: int) -> None:
    from torchtitan_nemotron3.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.int32) as w:
        left = tokens
        while left > 0:
            n = int(min(left, max(2, rng.lognormal(7.0, 0.8))))
            doc = rng.integers(2, 131_072, size=n, dtype=np.int32)
            doc[-1] = 2  # EOS
            w.add_document(doc)
            left -= n
        w.commit()


def time_loader(blend: str, seq_len: int, rows: int, tokenizer=None, **kw) -> tuple[float, float]:
    """(tokens per CPU-second, CPU seconds per row) over ``rows`` rows of batch 1."""
    from torchtitan_nemotron3.data.pretrain import PretrainDataLoader

    cfg = PretrainDataLoader.Config(blend=blend, vocab_size=131_072, **kw)
    loader = PretrainDataLoader(cfg, dp_world_size=1, dp_rank=0, tokenizer=tokenizer,
                                seq_len=seq_len, local_batch_size=1)
    it = iter(loader)
    next(it)  # epoch order built, caches warm
    t0 = time.process_time()
    for _ in range(rows):
        next(it)
    dt = time.process_time() - t0
    return rows * seq_len / dt, dt / rows


def time_torchtitan_text(dataset_dir: str, tokenizer, seq_len: int, rows: int) -> float:
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader

    cfg = HuggingFaceTextDataLoader.Config(dataset="c4_test", dataset_path=dataset_dir)
    loader = cfg.build(dp_world_size=1, dp_rank=0, tokenizer=tokenizer, seq_len=seq_len,
                       local_batch_size=1)
    it = iter(loader)
    next(it)
    t0 = time.process_time()
    for _ in range(rows):
        next(it)
    return rows * seq_len / (time.process_time() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=20_000_000)
    p.add_argument("--seq_len", type=int, default=8192)
    p.add_argument("--rows", type=int, default=300)
    p.add_argument("--debug_rows", type=int, default=40)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from torchtitan.tools.logging import init_logger

    init_logger()
    L = args.seq_len
    step_s = L / STEP_TPS
    with tempfile.TemporaryDirectory() as d:
        prefixes = [os.path.join(d, f"{n}_text_document") for n in ("web", "code", "math")]
        t0 = time.time()
        for i, prefix in enumerate(prefixes):
            write_synthetic(prefix, args.tokens if i == 0 else args.tokens // 4, i)
        print(f"\nsynthetic data written in {time.time() - t0:.1f} s "
              f"({args.tokens / 1e6:.0f}M + 2 × {args.tokens / 4e6:.0f}M int32 tokens)\n")
        cases = [
            ("1 source, isolate_documents", prefixes[0], {}),
            ("1 source, EOS stream", prefixes[0], {"isolate_documents": False}),
            ("3 sources 0.5/0.3/0.2", f"0.5 {prefixes[0]} 0.3 {prefixes[1]} 0.2 {prefixes[2]}", {}),
        ]
        print(f"| rows of {L} tokens (batch 1, 1 core) | tokens/s per core | ms per local batch "
              f"| share of a {step_s * 1e3:.0f} ms step (43K tok/s/GPU) |")
        print("|---|---:|---:|---:|")
        for name, blend, kw in cases:
            tps, per_row = time_loader(blend, L, args.rows, **kw)
            print(f"| {name} | {tps / 1e6:.1f}M | {per_row * 1e3:.3f} | {per_row / step_s:.3%} |")

    # Part 2: the same documents, text path vs pre-tokenized
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from torchtitan_nemotron3.train.assets import ensure_debug_assets, ensure_debug_pretokenized

    tok_dir, data_dir = ensure_debug_assets()
    _, prefix = ensure_debug_pretokenized()
    tokenizer = HuggingFaceTokenizer(tokenizer_path=tok_dir)
    L2 = 2048
    ours, _ = time_loader(prefix, L2, args.debug_rows * 10, tokenizer=tokenizer)
    theirs = time_torchtitan_text(data_dir, tokenizer, L2, args.debug_rows)
    print(f"\n| debug corpus, rows of {L2} | tokens/s per core | ratio |")
    print("|---|---:|---:|")
    print(f"| TorchTitan 0.3.0 HuggingFaceTextDataLoader (tokenizes on the fly) | {theirs / 1e6:.2f}M | 1.0 |")
    print(f"| PretrainDataLoader, pre-tokenized (Megatron .bin/.idx) | {ours / 1e6:.1f}M | {ours / theirs:.0f}× |")


if __name__ == "__main__":
    main()
