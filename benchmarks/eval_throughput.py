#!/usr/bin/env python
"""Loglikelihood requests per second: our lm-eval model (requests packed many to a
row) against lm-eval's own ``hf`` model (transformers' NemotronHForCausalLM, one
padded request per row, its one-token-continuation cache on) on the same weights
and the same requests, in one process.

    python benchmarks/eval_throughput.py                        # debug model, CPU
    python benchmarks/eval_throughput.py --device cuda --requests 2048 --batch_size 32

The requests look like a multiple-choice task's: ``--contexts`` random contexts of
``--ctx_len`` tokens (uniform in a range) with ``--choices`` continuations each of
1-8 tokens. Both models see them through lm-eval's ``_loglikelihood_tokens``
(what ``loglikelihood`` calls after tokenizing). ``--batch_size``: rows per
forward for both (ours packs each row up to ``--row_tokens``). The largest
difference between the two models' log-probs is printed as a check.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.models import build_ours


def _requests(n_contexts, choices, lo, hi, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(n_contexts):
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ctx = torch.randint(0, vocab, (n,), generator=g).tolist()
        for _ in range(choices):
            m = int(torch.randint(1, 9, (1,), generator=g))
            reqs.append(
                (None, ctx, torch.randint(0, vocab, (m,), generator=g).tolist())
            )
    return reqs


def _time(fn, device, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flavor", default="debugmodel")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--contexts", type=int, default=32)
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--ctx_len", default="32-160", help="LO-HI tokens")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--row_tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2, help="best of N timed runs")
    opts = p.parse_args(argv)

    import lm_eval.models.huggingface as lm_hf

    from torchtitan_nemotron3 import flavor_args, save_pretrained
    from torchtitan_nemotron3.evaluate import NemotronLM
    from torchtitan_nemotron3.train.assets import ensure_debug_assets

    device, dtype = torch.device(opts.device), getattr(torch, opts.dtype)
    # transformers' torch path floors dt at time_step_min: ours too, so the two
    # compute the same function and the printed difference is a check
    args = flavor_args(opts.flavor).replace(time_step_limit=(1e-3, float("inf")))
    tokenizer, _ = ensure_debug_assets()
    model, _ = build_ours(args, dtype, device, "auto", compile_blocks=False)
    model.eval()
    lo, hi = (int(v) for v in opts.ctx_len.split("-"))
    reqs = _requests(opts.contexts, opts.choices, lo, hi, args.vocab_size, seed=1)

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, assets_dir=tokenizer)
        theirs = lm_hf.HFLM(
            pretrained=tmp,
            dtype=opts.dtype,
            device=opts.device,
            batch_size=opts.batch_size,
        )
    ours = NemotronLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=opts.batch_size,
        row_tokens=opts.row_tokens,
    )
    unpacked = NemotronLM(
        pretrained=model, tokenizer=tokenizer, batch_size=opts.batch_size, pack=False
    )
    impls = [
        ("lm-eval hf", theirs),
        ("ours, one per row", unpacked),
        ("ours, packed", ours),
    ]
    results, best = {}, {}
    with torch.no_grad():
        for name, lm in impls:  # warm-up
            lm._loglikelihood_tokens(reqs[: opts.choices], disable_tqdm=True)
        # interleaved, best of --repeats: a shared machine's load drifts over a run
        for _ in range(opts.repeats):
            for name, lm in impls:
                s, results[name] = _time(
                    lambda lm=lm: lm._loglikelihood_tokens(reqs, disable_tqdm=True),
                    device,
                    1,
                )
                best[name] = min(s, best.get(name, float("inf")))
    rows = [(name, best[name]) for name, _ in impls]
    diff = max(
        abs(a[0] - b[0])
        for a, b in zip(results["ours, packed"], results["lm-eval hf"], strict=True)
    )
    ref = rows[0][1]
    n = len(reqs)
    tokens = sum(len(c) + len(x) - 1 for _, c, x in reqs)
    print(
        f"{opts.flavor} {opts.dtype} on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
        f"torch threads {torch.get_num_threads()}: {n} requests, {tokens} tokens, "
        f"batch_size {opts.batch_size}, row_tokens {opts.row_tokens}"
    )
    print("| implementation | seconds | requests/s | tokens/s | vs lm-eval hf |")
    print("|---|---:|---:|---:|---:|")
    for name, s in rows:
        print(f"| {name} | {s:.3f} | {n / s:.1f} | {tokens / s:.0f} | {ref / s:.2f}x |")
    print(f"max |logprob ours packed - hf| = {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
