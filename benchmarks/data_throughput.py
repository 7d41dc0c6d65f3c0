#!/usr/bin/env python
"""Pre-tokenized data throughput on CPU: a markdown table.

    python benchmarks/data_throughput.py --tekken_json PATH/tekken_240911.json
    python benchmarks/data_throughput.py --tokenizer assets/hf/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16

(a) Reader: 8192-token windows at random documents and offsets of an int32 indexed
    dataset, each copied into an int64 torch tensor, one thread; ours
    (``data/indexed.py``) against megatron-core's ``IndexedDataset.get`` (when
    installed) on the same windows. Target ≥ 20M tokens/s per core.
(b) ``prepare()`` (``scripts/prepare_data.py``) on English technical prose (Python's
    own pydoc topics, ~2.5 KB documents, repeated), with 1 and 2 workers, against the
    ceiling of one thread calling ``encode_batch`` alone in this process; tokens/s of
    wall time and per CPU-second (all processes' CPU time, children included).

The 131K tokenizer: ``--tokenizer DIR`` (e.g. the Nano's own), or ``--tekken_json``:
Mistral's tekken file (shipped in the ``mistral-common`` wheel: ``pip install --no-deps
mistral-common==1.12.0``, ``mistral_common/data/tekken_240911.json``) rebuilt as an HF
``tokenizers`` byte-level BPE of 131,072 ids (1,000 special tokens, then 130,072 BPE
ranks, its own split regex): Nemotron-3's vocabulary size and tokenizer family, not
its tokenizer.
"""

import argparse
import base64
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
import torch

from torchtitan_nemotron3.data.indexed import IndexedDataset, IndexedDatasetWriter
from torchtitan_nemotron3.data.prepare import prepare

WINDOW = 8192


def cpu_seconds() -> float:
    """This process's and its reaped children's user + system CPU time."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


# ------------------------------------------------------------------- (a) reader


def bench_reader(tmp: str, tokens: int, windows: int, seed: int = 0) -> list[tuple]:
    rng = np.random.default_rng(seed)
    prefix = os.path.join(tmp, "reader")
    with IndexedDatasetWriter(prefix, np.int32) as w:
        left = tokens
        while left > 0:
            n = int(min(left, rng.integers(WINDOW, 4 * WINDOW)))
            w.add_document(rng.integers(0, 131_072, n, dtype=np.int32))
            left -= n
    ds = IndexedDataset(prefix)
    long_docs = np.flatnonzero(ds.doc_lengths >= WINDOW)
    docs = rng.choice(long_docs, windows)
    offsets = [int(rng.integers(0, ds.doc_lengths[d] - WINDOW + 1)) for d in docs]
    torch.set_num_threads(1)

    def ours():
        for d, o in zip(docs, offsets):
            torch.from_numpy(ds.tokens(int(d), o, WINDOW).astype(np.int64))

    rows = [("ours: IndexedDataset.tokens → int64 tensor", run_timed(ours, windows * WINDOW))]
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import IndexedDataset as Megatron
        ref = Megatron(prefix)

        def theirs():
            for d, o in zip(docs, offsets):  # one sequence per document here
                torch.from_numpy(ref.get(int(d), o, WINDOW).astype(np.int64))

        rows.append(("megatron-core 0.16.1: IndexedDataset.get → int64 tensor", run_timed(theirs, windows * WINDOW)))
        for d, o in zip(docs[:50], offsets[:50]):
            assert np.array_equal(ref.get(int(d), o, WINDOW), ds.tokens(int(d), o, WINDOW))
    except ImportError:
        pass
    return rows


def run_timed(fn, tokens: int, repeats: int = 3) -> tuple[float, float]:
    """Best of ``repeats``: (tokens per wall second, tokens per CPU second)."""
    best = None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), cpu_seconds()
        fn()
        wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
        if best is None or wall < best[0]:
            best = (wall, cpu)
    return tokens / best[0], tokens / max(best[1], 1e-9)


# ------------------------------------------------------------ (b) preparation


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character map (what ByteLevel uses)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def tekken_tokenizer(tekken_json: str, out_dir: str) -> str:
    """Mistral's tekken (tiktoken-style ranks) as an HF byte-level BPE in ``out_dir``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    with open(tekken_json, encoding="utf-8") as f:
        tk = json.load(f)
    specials = tk["config"]["default_num_special_tokens"]
    n_ranks = tk["config"]["default_vocab_size"] - specials
    b2u = bytes_to_unicode()
    pieces = [base64.b64decode(v["token_bytes"]) for v in tk["vocab"][:n_ranks]]
    strs = ["".join(b2u[b] for b in p) for p in pieces]
    special_names = ["<unk>", "<s>", "</s>"] + [f"<SPECIAL_{k}>" for k in range(3, specials)]
    vocab = {name: k for k, name in enumerate(special_names)}
    vocab.update({s: specials + r for r, s in enumerate(strs)})
    rank = {p: r for r, p in enumerate(pieces)}
    merges = []
    for r, p in enumerate(pieces):  # tiktoken's merges: every split into two known pieces
        for cut in range(1, len(p)):
            left, right = p[:cut], p[cut:]
            if left in rank and right in rank and rank[left] < r and rank[right] < r:
                merges.append((r, rank[left], rank[right]))
    merges.sort()
    merges = [(strs[a], strs[b]) for _, a, b in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(tk["config"]["pattern"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(special_names)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
    assert tok.get_vocab_size() == 131_072, tok.get_vocab_size()
    sample = "The quick brown fox — naïve café, 数据 1234.\n\tdef f(x): return x**2"
    assert tok.decode(tok.encode(sample).ids) == sample
    return out_dir


def english_docs(repeat: int) -> list[str]:
    """Python's pydoc topics cut into ~2.5 KB documents at paragraph ends."""
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        cur = ""
        for para in topics[name].split("\n\n"):
            cur += para + "\n\n"
            if len(cur) >= 2500:
                docs.append(cur)
                cur = ""
        if cur.strip():
            docs.append(cur)
    return docs * repeat


def bench_prepare(tmp: str, tok_dir: str, repeat: int, workers: list[int]) -> tuple[list[tuple], dict]:
    from tokenizers import Tokenizer

    docs = english_docs(repeat)
    data = os.path.join(tmp, "corpus.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    facts = {"documents": len(docs), "MB": os.path.getsize(data) / 1e6}
    c0 = cpu_seconds()
    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    facts["load CPU-s"] = cpu_seconds() - c0  # once per prepare() run (forked workers share it)
    facts["vocab"] = tok.get_vocab_size()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    rows = []
    w0, c0 = time.perf_counter(), cpu_seconds()
    n = 0
    for k in range(0, len(docs), 256):
        n += sum(len(e.ids) for e in tok.encode_batch(docs[k : k + 256], add_special_tokens=False))
    wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
    rows.append(("encode_batch alone, 1 thread (ceiling)", 1, n / wall, n / cpu))
    for w in workers:
        w0, c0 = time.perf_counter(), cpu_seconds()
        r = prepare([data], tok_dir, os.path.join(tmp, f"prep{w}"), workers=w, progress=False)
        wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
        rows.append((f"prepare(), {w} worker{'s' if w > 1 else ''}", w, r.tokens / wall, r.tokens / cpu))
        facts["tokens"] = r.tokens
        facts["dtype"] = r.manifest["dtype"]
    facts["bytes/token"] = os.path.getsize(data) / facts["tokens"]
    return rows, facts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tokenizer", help="a folder with a ~131K-id tokenizer.json")
    g.add_argument("--tekken_json", help="mistral-common's tekken_240911.json, rebuilt as HF BPE")
    p.add_argument("--reader_tokens", type=int, default=64 * 2**20)
    p.add_argument("--windows", type=int, default=4000)
    p.add_argument("--repeat", type=int, default=3, help="copies of the pydoc corpus")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    if args.tekken_json is None and args.tokenizer is None:
        try:
            from importlib.resources import files

            args.tekken_json = str(files("mistral_common") / "data" / "tekken_240911.json")
        except ImportError:
            pass
    with tempfile.TemporaryDirectory(prefix="data_throughput.") as tmp:
        print("## (a) reader: 8192-token windows → int64 torch tensors, 1 thread\n")
        print("| reader | M tokens/s (wall) | M tokens/CPU-s | ratio to megatron-core |")
        print("|---|---|---|---|")
        rows = bench_reader(tmp, args.reader_tokens, args.windows)
        ref = rows[-1][1][0] if len(rows) > 1 else None
        for name, (wall, cpu) in rows:
            ratio = f"{wall / ref:.2f}" if ref else "n/a"
            print(f"| {name} | {wall / 1e6:.0f} | {cpu / 1e6:.0f} | {ratio} |")
        if args.tokenizer:
            tok_dir, what = args.tokenizer, args.tokenizer
        elif args.tekken_json and os.path.exists(args.tekken_json):
            t0 = time.perf_counter()
            tok_dir = tekken_tokenizer(args.tekken_json, os.path.join(tmp, "tekken"))
            what = f"tekken_240911 as HF BPE (built in {time.perf_counter() - t0:.0f} s)"
        else:
            print("\n(b) skipped: give --tokenizer DIR or --tekken_json PATH", file=sys.stderr)
            return
        rows, facts = bench_prepare(tmp, tok_dir, args.repeat, args.workers)
        print(f"\n## (b) prepare_data: {what}, vocab {facts['vocab']:,}, {facts['dtype']} ids\n")
        print(
            f"{facts['documents']} documents, {facts['MB']:.2f} MB of jsonl, {facts['tokens']:,} tokens "
            f"({facts['bytes/token']:.2f} bytes/token); loading tokenizer.json costs "
            f"{facts['load CPU-s']:.1f} CPU-s once per run, included below\n"
        )
        print("| path | workers | K tokens/s (wall) | K tokens/s per worker (wall) | K tokens/CPU-s | CPU-s ratio to ceiling |")
        print("|---|---|---|---|---|---|")
        ceiling = rows[0][3]
        for name, w, wall, cpu in rows:
            print(f"| {name} | {w} | {wall / 1e3:.0f} | {wall / w / 1e3:.0f} | {cpu / 1e3:.0f} | {cpu / ceiling:.2f} |")


if __name__ == "__main__":
    main()
