"""The dry run's printed report: memory per GPU, traffic per mesh dimension, and
a one-line verdict."""

from __future__ import annotations

import sys

GiB = 2**30


_UNIT = {"GiB": GiB, "MiB": 2**20}


def _mem(n: float, unit: str) -> str:
    return f"{n / _UNIT[unit]:8.2f}"


def print_report(r, gpu_gib: float, out=None) -> str:
    """The tables and the one-line verdict (returned too)."""
    from .shards import CATEGORIES

    j, L, m, tr = r.job, r.layout, r.memory, r.job.training
    out = out or sys.stdout
    w = lambda s="": print(s, file=out)
    w(f"## Dry run: {j.flavor} on {j.ngpu} ranks, {L.name()} ({j.source})")
    w(
        f"meshes: dense pp{L.pp} × dp_replicate{L.dp_replicate} × fsdp{L.fsdp} × tp{L.tp}; "
        f"sparse pp{L.pp} × dp_replicate{L.dp_replicate} × efsdp{L.efsdp} × ep{L.ep}"
    )
    w(
        f"seq {tr.seq_len} × local batch {tr.local_batch_size}; AC {j.ac}; master "
        f"{tr.dtype}, compute {tr.mixed_precision_param}, reduce {tr.mixed_precision_reduce}; "
        f"{r.shards.total_numel:,} parameters; {r.flops_per_token / 1e9:.2f} GFLOP/token "
        f"(model/flops.py); built and parallelized on meta in {r.seconds:.1f} s"
    )
    held = [n for n in r.shards.rank_numel if n] or [0]  # PP: rank 0's stage
    scope = f"the {len(held)} ranks of rank 0's PP stage" if L.pp > 1 else "rank"
    w(
        f"stored parameter elements per {scope}: min {min(held):,} / max {max(held):,} "
        f"(rank 0: {sum(r.shards.local_numel.values()):,}; {r.acts.layers} of "
        f"{len(r.job.model_spec.model.layers)} blocks)"
    )
    u = "GiB" if m.total >= GiB else "MiB"
    _gib = lambda n: _mem(n, u)
    w(f"\n| per GPU (rank 0) | {u} | how |\n|---|---:|---|")
    sh = r.shards
    lean = bool(sh.frozen_bytes or sh.trainable_numel)
    for c in CATEGORIES:
        how = f"local shard × {tr.dtype}"
        if lean:
            how = (
                f"adapters {sh.trainable_numel.get(c, 0):,} × {tr.dtype} + frozen "
                f"base {sh.frozen_bytes.get(c, 0) / GiB:.2f} GiB as stored"
            )
        w(f"| params: {c} | {_gib(m.params[c])} | {how} |")
    if lean:
        by = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in sorted(sh.frozen_by_dtype.items()))
        n = sum(sh.trainable_numel.values())
        if "nf4" in sh.frozen_by_dtype and r.job.ngpu > 1:
            by += (
                f" (NF4 sharded by FSDP; {sh.nf4_replicated / GiB:.2f} GiB of it "
                "replicated: not splittable into whole blocks, or TP/EP/HSDP)"
            )
        w(f"| (frozen base by dtype) | {_gib(sum(sh.frozen_by_dtype.values()))} | {by}; no gradient, no AdamW state |")
        w(f"| gradients | {_gib(m.grads)} | adapters only ({n:,} elements), {tr.dtype} |")
        w(f"| AdamW state | {_gib(m.optimizer)} | 2 fp32 moments per adapter element |")
    else:
        w(f"| gradients | {_gib(m.grads)} | sharded, {tr.dtype} |")
        w(f"| AdamW state | {_gib(m.optimizer)} | 2 fp32 moments per stored element |")
    if m.dequant:
        w(f"| NF4 dequantized tensor | {_gib(m.dequant)} | largest NF4 tensor in bf16, one at a time |")
    w(
        f"| FSDP all-gather buffers | {_gib(m.gather)} | largest adjacent pair of units, "
        f"{tr.mixed_precision_param}{' (an NF4 base as NF4)' if 'nf4' in sh.frozen_by_dtype else ''} |"
    )
    w(
        f"| FSDP reduce-scatter buffer | {_gib(m.reduce)} | largest unit's gradient, "
        f"{tr.mixed_precision_reduce} |"
    )
    kib = ", ".join(f"{t} {v / 1024:.1f}" for t, v in r.acts.per_type.items())
    w(
        f"| activations (estimate) | {_gib(r.acts.total)} | AC {j.ac}: {r.acts.layers} blocks × "
        f"{r.acts.tokens} tokens, KiB/token/block: {kib}; recompute "
        f"{_gib(r.acts.recompute).strip()}, loss {_gib(r.acts.loss).strip()} {u} |"
    )
    w(
        f"| **total** | **{_gib(m.total)}** | + CUDA context/NCCL ~1–3 GiB, fragmentation |"
    )
    gu, gs = ("GB", 1e9) if r.traffic.total >= 1e9 else ("MB", 1e6)
    w(f"\n| mesh dim | size | traffic | {gu}/step/GPU |\n|---|---:|---|---:|")
    sizes = {
        "fsdp": L.fsdp,
        "efsdp": L.efsdp,
        "dp_replicate": L.dp_replicate,
        "ep": L.ep,
        "tp": L.tp,
        "pp": L.pp,
    }
    for dim, what, nbytes in r.traffic.rows:
        w(f"| {dim} | {sizes[dim]} | {what} | {nbytes / gs:.2f} |")
    w(f"| **total** | | | **{r.traffic.total / gs:.2f}** |")
    verdict = (
        f"verdict: {'fits in' if m.total / GiB <= gpu_gib else 'EXCEEDS'} "
        f"{gpu_gib:g} GiB per GPU: {m.total / GiB:.1f} GiB estimated "
        f"({100 * m.total / GiB / gpu_gib:.0f}%), {j.flavor} {L.name()} AC {j.ac} "
        f"seq {tr.seq_len}×{tr.local_batch_size}"
    )
    w(f"\n{verdict}")
    return verdict
