"""Bytes each GPU receives per training step, by mesh dimension.

Ring/pairwise collectives move ``(n − 1)/n`` of the gathered (or reduced) buffer
into each of the ``n`` ranks; that is what is counted (a GPU sends as much as it
receives). Symbols: per FSDP unit and mesh, ``U`` the gathered elements
(unsharded over FSDP, still local to TP/EP), ``s`` its FSDP degree, ``r`` HSDP
replicas (``U_t``: the elements that train, all but a LoRA base; an NF4
element of a sharded QLoRA base is gathered at its NF4 bytes, not ``pb``);
``pb``/``rb``/``cb`` bytes per param-dtype / reduce-dtype / activation element; ``T`` tokens per rank per microbatch (local_batch × seq_len / cp),
``A`` microbatches per step (gradient accumulation; FSDP gathers and reduces
per microbatch), ``k`` top-k, ``D`` hidden size, ``n_E`` MoE blocks and ``n_B``
blocks on the rank.

  fsdp / efsdp  all-gather  U·pb·(s−1)/s per gather; forward, and again in
                            backward when the unit reshards after forward      ×A
                reduce-scatter of gradients  U_t·rb·(s−1)/s                     ×A
  dp_replicate  all-reduce of the sharded gradients  2·(U_t/s)·rb·(r−1)/r       ×A
  ep            all-to-all dispatch + combine, forward and backward:
                4·n_E·(T/tp)·k·D·cb·(ep−1)/ep  (+2 for full AC's recompute)   ×A
  tp            sequence parallel all-gather + reduce-scatter around every block,
                forward and backward: 4·(n_B+1)·T·D·cb·(tp−1)/tp (+1 embedding/
                lm_head boundary; +2 per block for full AC, +1 for selective,
                whose policy saves reduce-scatter outputs but not all-gathers) ×A
  pp            send/recv of activations forward and their gradients backward,
                a middle stage: 2·T·D·cb/tp, ×(1+D_mtp) with MTP (its inputs
                travel beside the hidden state)                                ×A
Routing is assumed balanced (each rank receives its share of ``T·k`` rows);
real routing is less even. The count exchange before each all-to-all and the
loss all-reduce are a few bytes and not counted.
"""

from collections import Counter
from dataclasses import dataclass

from ..model.pattern import MOE
from .layout import Layout
from .shards import Shards

DIMS = ("fsdp", "efsdp", "dp_replicate", "ep", "tp", "pp")


@dataclass
class Traffic:
    by_dim: Counter  # mesh dimension -> bytes received per GPU per step
    rows: list  # (mesh dim, what, bytes)

    @property
    def total(self) -> int:
        return sum(self.by_dim.values())


def _frac(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


def estimate(
    shards: Shards,
    model_config,
    layout: Layout,
    *,
    local_batch: int,
    seq_len: int,
    ac: str,
    param_bytes: int = 2,
    reduce_bytes: int = 4,
    compute_bytes: int = 2,
    accum: int = 1,
    stage_layers: list[int] | None = None,
) -> Traffic:
    """``stage_layers``: the blocks on this rank's PP stage (default: the first
    ``layers/pp``)."""
    rows: list = []

    def add(dim, what, nbytes):
        if nbytes:
            rows.append((dim, what, int(nbytes * accum)))

    gather, reduce, allreduce = Counter(), Counter(), Counter()
    for unit in shards.units:
        for g in unit.groups:
            dim = g.mesh
            times = 2 if unit.reshard_after_forward else 1
            gather[dim] += times * g.gather_bytes(param_bytes) * _frac(g.shard)
            reduce[dim] += g.trainable * reduce_bytes * _frac(g.shard)
            allreduce["dp_replicate"] += (
                2 * g.trainable / g.shard * reduce_bytes * _frac(g.replicate)
            )
    for dim in ("fsdp", "efsdp"):
        add(dim, "all-gather params (fwd + bwd)", gather[dim])
        add(dim, "reduce-scatter grads", reduce[dim])
    add("dp_replicate", "all-reduce sharded grads", allreduce["dp_replicate"])

    if stage_layers is None:
        stage_layers = range(-(-len(model_config.layers) // layout.pp))
    stage = [model_config.layers[i] for i in stage_layers]
    T = local_batch * seq_len // layout.cp
    D = model_config.dim
    if layout.ep > 1:
        n_moe = [layer for layer in stage if layer.layer_type == MOE]
        k = n_moe[0].mixer.router.top_k if n_moe else 0
        passes = 4 + (2 if ac == "full" else 0)
        per = T // layout.tp * k * D * compute_bytes * _frac(layout.ep)
        add("ep", f"all-to-all dispatch+combine ×{passes}", passes * len(n_moe) * per)
    if layout.tp > 1:
        passes = 4 + {"full": 2, "selective": 1}.get(ac, 0)
        per = T * D * compute_bytes * _frac(layout.tp)
        add(
            "tp",
            f"SP all-gather+reduce-scatter ×{passes}/block",
            (passes * len(stage) + 4) * per,
        )
    if layout.pp > 1:
        # with MTP the D embedded shifted ids travel beside the hidden state
        mtp = getattr(model_config, "mtp", None)
        tensors = 1 + (mtp.num_depths if mtp is not None else 0)
        add(
            "pp",
            "send/recv activations + grads" + (f" (×{tensors}: MTP inputs)" if tensors > 1 else ""),
            2 * tensors * T * D * compute_bytes // layout.tp,
        )
    by_dim = Counter()
    for dim, _, nbytes in rows:
        by_dim[dim] += nbytes
    return Traffic(by_dim, rows)
