"""Activation memory held from forward to backward: an estimate, per token and layer.

Counted from what autograd (or TorchTitan's AC policy) keeps per token, in
elements of the compute dtype (b = 2 bytes under bf16) plus a few fp32 values;
kernel workspaces, allocator fragmentation, the backward's transient gradients
and the optimizer step's temporaries are not counted. Real numbers can differ by
tens of percent: measure on a GPU before trusting a layout that is within ~15% of
the memory limit.

Symbols: D hidden; Mamba: I = heads·head_dim, X = I + 2·G·N (conv channels),
Z = I + X + H (in_proj width), H heads, P head dim, N state, G groups, Q chunk;
attention: Hq, Hkv heads, hd head dim; MoE: k top-k, F expert width, Fs shared
width, E experts (with latent MoE the routed D below is the latent width S, and
fc1's output and fc2's input, 2S, are kept too); MLP: F. MTP: its sub-layers once per
depth, on the last stage. Every block also keeps its input h (D) and, without
AC, the RMSNorm output (D) and one fp32 rstd.

none (everything autograd saves):
  Mamba2     D+D + Z (in_proj out) + 3X (conv in, conv out, silu) + 4I (y, silu(z),
             gated y, normed y) ; fp32: 2H (dt) + H·P·N/Q (chunk states) + G + 1
  attention  D+D + 3·Hq·hd (q, attention out, its reshape) + 2·Hkv·hd (k, v) ;
             fp32: Hq (log-sum-exp) + 1
  MoE        D+D + k·(3D + 2F) (dispatched rows, up out, relu, down out, weighted)
             + 2·Fs + 2D (shared up, relu, shared out, combined) ;
             fp32: 2E (router logits, scores) + 3k (top-k weights, int64 ids) + 1
  MLP        D+D + 2F (up, relu) + D
selective (TorchTitan's per-op policy: the block input, every other
  mm/linear output, SDPA, top-k, all-to-all and, with ``NemotronHSelectiveAC``,
  the grouped GEMMs and the SSD scan):
  Mamba2     D + Z (in_proj; out_proj recomputed) + I (SSD output)
  attention  D + Hq·hd (q) + Hkv·hd (v; k, o_proj recomputed) + Hq·hd (SDPA) ;
             fp32: Hq
  MoE        D + k·(F + D) (grouped GEMMs) + [EP: 2·k·D, the all-to-all outputs]
             + D (shared down; shared up recomputed) ; fp32: E (gate) + 3k
  MLP        D + F (up; down recomputed)
full: the block input D per layer, plus during backward one block recomputed
  with nothing checkpointed (the largest "none" block).
Loss (ChunkedLossWrapper): the final norm's input and output (2D) plus one chunk
of logits (seq/num_chunks rows × V × (b + 4 + 4): bf16 logits, fp32 upcast, fp32
gradient), transient.
Tokens per rank: local_batch × seq_len / cp, ÷ tp (sequence parallel shards the
block activations; TP shards the mixers' inner widths the same way). PP: the
first stage holds its ``layers/pp`` blocks for min(pp, microbatches) microbatches,
plus, with MTP, the D embedded shifted-id tensors (D per token) it sends on.
"""

from dataclasses import dataclass

from ..model.pattern import ATTENTION, MAMBA, MLP, MOE

FP32 = 4


@dataclass
class PerToken:
    """Saved bytes per token of one layer: ``b``-sized elements and fp32 values."""

    elems: int
    fp32: int

    def bytes(self, b: int) -> int:
        return self.elems * b + self.fp32 * FP32


def saved_per_token(layer_cfg, ac: str, ep: int = 1) -> PerToken:
    """The formula of the module docstring for one block config and AC mode
    (``full`` here: what the block keeps, its input)."""
    kind, m = layer_cfg.layer_type, layer_cfg.mixer
    D = layer_cfg.norm.normalized_shape
    if ac == "full":
        return PerToken(D, 0)
    none = ac == "none"
    if kind == MAMBA:
        H, P, N, G, Q = m.num_heads, m.head_dim, m.state_size, m.n_groups, m.chunk_size
        Z, X, I = m.in_proj.out_features, m.conv1d.in_channels, H * P
        if none:
            return PerToken(2 * D + Z + 3 * X + 4 * I, 2 * H + H * P * N // Q + G + 1)
        return PerToken(D + Z + I, 0)
    if kind == ATTENTION:
        q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
        if none:
            return PerToken(2 * D + 3 * q + 2 * kv, m.n_heads + 1)
        return PerToken(D + 2 * q + kv, m.n_heads)
    if kind == MOE:
        k, E = m.router.top_k, m.num_experts
        F = m.routed_experts.inner_experts.hidden_dim
        Fs = m.shared_experts.up_proj.out_features
        # Routed tokens are S wide with latent MoE (fc1's output, fc2's input
        # saved too), D wide otherwise.
        Dr = m.routed_experts.inner_experts.dim
        latent = 2 * Dr if getattr(m, "fc1_latent_proj", None) is not None else 0
        if none:
            return PerToken(
                2 * D + k * (3 * Dr + 2 * F) + 2 * Fs + 2 * D + latent,
                2 * E + 3 * k + 1,
            )
        a2a = 2 * k * Dr if ep > 1 else 0
        return PerToken(D + k * (F + Dr) + a2a + D + latent, E + 3 * k)
    assert kind == MLP
    F = m.up_proj.out_features
    if none:
        return PerToken(2 * D + 2 * F + D, 1)
    return PerToken(D + F, 0)


@dataclass
class Activations:
    per_type: dict  # layer type -> bytes per token per layer (this AC mode)
    layers: int  # blocks on this rank
    tokens: int  # tokens per rank whose activations are held at once
    blocks: int  # bytes: all blocks' saved activations
    recompute: int  # bytes: full AC's one recomputed block
    loss: int  # bytes: final norm + one logits chunk

    @property
    def total(self) -> int:
        return self.blocks + self.recompute + self.loss


def estimate(
    model_config,
    *,
    ac: str,
    local_batch: int,
    seq_len: int,
    compute_bytes: int = 2,
    tp: int = 1,
    cp: int = 1,
    pp: int = 1,
    ep: int = 1,
    microbatches: int = 1,
    loss_chunks: int = 8,
    stage_layers: list[int] | None = None,
) -> Activations:
    """Activation bytes on the most loaded rank (PP: the first stage, its blocks
    ``stage_layers`` when known, else the first ``layers/pp``)."""
    layers = model_config.layers
    if stage_layers is None:
        stage_layers = range(-(-len(layers) // pp))
    stage = [layers[i] for i in stage_layers]
    mtp = getattr(model_config, "mtp", None)
    if mtp is not None and (pp == 1 or len(stage) == len(layers)):
        # The MTP block's sub-layers run once per depth, each depth's saved.
        stage += list(mtp.layers) * mtp.num_depths
    mb_tokens = local_batch * seq_len // (cp * max(microbatches, 1))
    held = (
        mb_tokens * min(pp, max(microbatches, 1))
        if pp > 1
        else local_batch * seq_len // cp
    )
    per_rank = held // tp
    b = compute_bytes
    per_type, blocks = {}, 0
    for layer in stage:
        n = saved_per_token(layer, ac, ep).bytes(b)
        per_type[layer.layer_type] = n
        blocks += n * per_rank
    if mtp is not None and pp > 1:
        # a stage before the block's sends (hidden, e_1..e_D) and keeps them for
        # its backward (model/mtp.py: the pipeline carries the MTP inputs)
        blocks += mtp.num_depths * model_config.dim * b * per_rank
    recompute = 0
    if ac == "full":
        recompute = max(saved_per_token(layer, "none", ep).bytes(b) for layer in stage)
        recompute *= mb_tokens // tp
    loss = 0
    if pp == 1 or len(stage) == len(layers):
        V, D = model_config.vocab_size, model_config.dim
        rows = local_batch * seq_len // (cp * loss_chunks)
        loss = 2 * D * b * per_rank + rows * V * (b + 2 * FP32)
    return Activations(per_type, len(stage), per_rank, blocks, recompute, loss)
