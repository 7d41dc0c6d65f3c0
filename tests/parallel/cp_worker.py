"""One rank of the context-parallel layer tests (CPU, gloo, fp64).

Every rank builds the same tiny ``M*`` model and the same packed batch; the
unsharded mixer on the whole row is the reference. The CP run feeds this rank's
shard (TorchTitan's head-tail order, or contiguous) with the global document ids
(``context_parallel.global_seq_idx``) and compares outputs and input gradients on
this rank's tokens, and parameter gradients summed over the ranks (as the data-
parallel reduction over ``fsdp = dp × cp`` does). Rank 0 writes the largest errors
as JSON; any mismatch beyond the tolerance fails the rank.
"""

import copy
import itertools
import json
import os

import torch
import torch.distributed as dist

from torchtitan_nemotron3.model import build_model_config
from torchtitan_nemotron3.model.args import NemotronHArgs
from torchtitan_nemotron3.model.context_parallel import (
    CPLayout,
    global_seq_idx,
    set_context_parallel,
)
from torchtitan_nemotron3.model.model import seq_idx_from_positions

TOL = 1e-10
BATCH = 3


def tiny_model() -> torch.nn.Module:
    """An ``M*-M`` NemotronH with tiny dims (chunks of 4, several per segment), its
    weights drawn large enough that every path matters."""
    args = NemotronHArgs(
        vocab_size=32,
        hidden_size=16,
        hybrid_override_pattern="M*-M",
        num_attention_heads=4,
        intermediate_size=32,
        num_key_value_heads=2,
        head_dim=4,
        mamba_num_heads=4,
        mamba_head_dim=4,
        ssm_state_size=4,
        n_groups=2,
        conv_kernel=4,
        chunk_size=4,
        time_step_min=0.05,
        time_step_max=0.5,
    )
    cfg = build_model_config(args, kernel_backend="torch")
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_states()
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() > 1:
                p.normal_(0.0, 0.4)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
    return model.to(torch.float64)


def packed_positions(L: int, segment: int) -> torch.Tensor:
    """Three rows of documents against segments of ``segment`` tokens: row 0 starts
    documents inside the conv halo of a boundary (``S - 1``), right after one
    (``S + 2``), exactly on one (``2S``) and just before one (``3S - 1``), the last
    running to the row's end across the remaining segments; row 1 is one document
    that began in an earlier row (positions never 0: its state crosses every
    boundary); row 2 starts one exactly on the first boundary and one mid-row."""
    S = segment
    rows = [[0, S - 1, S + 2, 2 * S, 3 * S - 1], [0], [0, S, L // 2 + 1]]
    out = []
    for starts in rows:
        bounds = [*starts, L]
        out.append(
            torch.cat([torch.arange(b - a) for a, b in itertools.pairwise(bounds)])
        )
    out[1] += 5
    return torch.stack(out)


def _check(name: str, got: torch.Tensor, ref: torch.Tensor, errors: dict) -> None:
    err = (got - ref).abs().max().item()
    errors[name] = max(err, errors.get(name, 0.0))
    assert err <= TOL, (name, err, ref.abs().max().item())


def _run_mixer(mixer, x_BLD, seq_idx_BL, grad_BLD):
    x_BLD = x_BLD.detach().requires_grad_()
    out_BLD = mixer(x_BLD, seq_idx_BL)
    out_BLD.backward(grad_BLD)
    return (
        out_BLD.detach(),
        x_BLD.grad,
        {n: p.grad for n, p in mixer.named_parameters()},
    )


def _compare_layer(kind: str, mixer, layout: CPLayout, errors: dict, L: int) -> None:
    """The mixer on this rank's shard vs the unsharded mixer, packed and unpacked."""
    W = layout.size
    S = L // (W * layout.n_segments)
    g = torch.Generator().manual_seed(1)
    x_BLD = torch.randn(BATCH, L, 16, generator=g, dtype=torch.float64)
    grad_BLD = torch.randn(BATCH, L, 16, generator=g, dtype=torch.float64)
    # Documents against head-tail segments; contiguous shards' boundaries are a subset.
    positions_BL = packed_positions(L, L // (2 * W))
    idx = layout.global_index(L // W, "cpu")
    for packed in (True, False):
        seq_idx_BL = seq_idx_from_positions(positions_BL) if packed else None
        mixer.zero_grad()
        ref_out, ref_dx, ref_dp = _run_mixer(mixer, x_BLD, seq_idx_BL, grad_BLD)
        local_seq_idx = None
        if packed:
            local_seq_idx = global_seq_idx(positions_BL[:, idx], layout)
            assert torch.equal(local_seq_idx, seq_idx_BL[:, idx])
        cp_mixer = copy.deepcopy(mixer)
        cp_mixer.zero_grad()
        cp_mixer.set_context_parallel(layout)
        out, dx, dp = _run_mixer(
            cp_mixer, x_BLD[:, idx], local_seq_idx, grad_BLD[:, idx]
        )
        tag = f"{kind}/{'headtail' if layout.load_balanced else 'contiguous'}"
        _check(f"{tag}/out", out, ref_out[:, idx], errors)
        _check(f"{tag}/dx", dx, ref_dx[:, idx], errors)
        for n, grad in dp.items():
            dist.all_reduce(grad, group=layout.group)
            _check(f"{tag}/d_params/{n}", grad, ref_dp[n], errors)
        if packed and kind == "mamba":
            # The state passed across shards matters: cutting every row at the
            # segment boundaries instead (no state, no halo) is far off.
            cut_BL = seq_idx_BL * 64 + torch.arange(L) // S
            with torch.no_grad():
                cut_out = mixer(x_BLD, cut_BL)
            errors["mamba/without_state_passing"] = (
                (cut_out - ref_out).abs().max().item()
            )


def _compare_model(model, layout: CPLayout, errors: dict, L: int) -> None:
    """The whole model's layers on this rank's shard, as the model's forward runs
    them under CP: global document ids once, then every block."""
    W = layout.size
    g = torch.Generator().manual_seed(2)
    tokens_BL = torch.randint(0, 32, (BATCH, L), generator=g)
    positions_BL = packed_positions(L, L // (2 * W))
    grad_BLV = torch.randn(BATCH, L, 32, generator=g, dtype=torch.float64)
    model.zero_grad()
    ref_BLV = model(tokens_BL, positions=positions_BL)
    ref_BLV.backward(grad_BLV)
    ref_dp = {n: p.grad for n, p in model.named_parameters()}

    cp_model = copy.deepcopy(model)
    cp_model.zero_grad()
    assert set_context_parallel(cp_model, layout) == 3
    idx = layout.global_index(L // W, "cpu")
    seq_idx_BL = global_seq_idx(positions_BL[:, idx], layout)
    h_BLD = cp_model.tok_embeddings(tokens_BL[:, idx])
    for layer in cp_model.layers.values():
        h_BLD = layer(h_BLD, seq_idx_BL)
    out_BLV = cp_model.lm_head(cp_model.norm(h_BLD))
    out_BLV.backward(grad_BLV[:, idx])
    tag = f"model/{'headtail' if layout.load_balanced else 'contiguous'}"
    _check(f"{tag}/logits", out_BLV, ref_BLV[:, idx].detach(), errors)
    for n, p in cp_model.named_parameters():
        dist.all_reduce(p.grad, group=layout.group)
        _check(f"{tag}/d_params/{n}", p.grad, ref_dp[n], errors)


def worker(
    rank: int, world: int, rdv: str, layers: list[str], sizes: list[int], L: int
) -> None:
    """One spawn for every CP size: groups of the first ``size`` ranks (each rank
    builds every group, as ``new_group`` requires; the others skip the run)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{rdv}", rank=rank, world_size=world
    )
    try:
        model = tiny_model()
        results = {}
        for size in sizes:
            group = dist.new_group(list(range(size)))
            if rank >= size:
                continue
            errors: dict = {}
            for load_balanced in (True, False):
                layout = CPLayout(group, load_balanced=load_balanced)
                if "mamba" in layers:
                    _compare_layer("mamba", model.layers["0"].mixer, layout, errors, L)
                if "model" in layers:
                    _compare_model(model, layout, errors, L)
                if "attention" in layers:
                    _compare_layer(
                        "attention", model.layers["1"].mixer, layout, errors, L
                    )
            results[size] = errors
        if rank == 0:
            with open(os.path.join(os.path.dirname(rdv), "errors.json"), "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


# --- the kernel path under CP: mamba-ssm's SSD and fla-core's conv, interpreted ---------


def kernel_mixer(kernel_backend: str) -> torch.nn.Module:
    """One Mamba2 mixer with dims the Triton kernels take (P = N = 16, chunks of 16)."""
    args = NemotronHArgs(
        vocab_size=32,
        hidden_size=32,
        hybrid_override_pattern="M",
        mamba_num_heads=4,
        mamba_head_dim=16,
        ssm_state_size=16,
        n_groups=2,
        conv_kernel=4,
        chunk_size=16,
        time_step_min=0.05,
        time_step_max=0.5,
    )
    cfg = build_model_config(args, kernel_backend=kernel_backend)
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_states()
        for name, p in model.named_parameters():
            if (name.endswith("weight") and p.dim() > 1) or name.endswith("bias"):
                p.normal_(0.0, 0.2)
    return model.layers["0"].mixer


def kernel_worker(rank: int, world: int, rdv: str, L: int) -> None:
    """The ``cuda`` backend (interpreted kernels) on CP shards vs the torch mixer on
    whole rows, fp32; rank 0 writes ``max |Δ| / max |ref|`` per tensor."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{rdv}", rank=rank, world_size=world
    )
    try:
        ref_mixer, cp_mixer = kernel_mixer("torch"), kernel_mixer("cuda")
        layout = CPLayout(dist.group.WORLD, load_balanced=True)
        cp_mixer.set_context_parallel(layout)
        g = torch.Generator().manual_seed(1)
        x_BLD = torch.randn(2, L, 32, generator=g)
        grad_BLD = torch.randn(2, L, 32, generator=g)
        positions_BL = packed_positions(L, L // (2 * world))[:2]
        seq_idx_BL = seq_idx_from_positions(positions_BL)
        idx = layout.global_index(L // world, "cpu")
        ref = _run_mixer(ref_mixer, x_BLD, seq_idx_BL, grad_BLD)
        got = _run_mixer(
            cp_mixer,
            x_BLD[:, idx],
            global_seq_idx(positions_BL[:, idx], layout),
            grad_BLD[:, idx],
        )
        errors = {}
        for name, a, b in [
            ("out", got[0], ref[0][:, idx]),
            ("dx", got[1], ref[1][:, idx]),
        ]:
            errors[name] = ((a - b).abs().max() / b.abs().max()).item()
        for n, grad in got[2].items():
            dist.all_reduce(grad)
            errors[n] = ((grad - ref[2][n]).abs().max() / ref[2][n].abs().max()).item()
        if rank == 0:
            with open(
                os.path.join(os.path.dirname(rdv), "kernel_errors.json"), "w"
            ) as f:
                json.dump(errors, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    # python cp_worker.py OUT_DIR: run with TRITON_INTERPRET=1 (set before triton loads).
    import sys

    import torch.multiprocessing as mp

    from torchtitan_nemotron3.ops import loader

    kernels, status = loader.ssd_kernels()
    assert status.available, status.detail
    out_dir = sys.argv[1]
    mp.start_processes(
        kernel_worker,
        args=(2, os.path.join(out_dir, "rdv"), 64),
        nprocs=2,
        start_method="fork",
    )


# --- the "flex" attention backend under CP: eager flex forward on CPU -----------------


def _with_flex_attention(model: torch.nn.Module, block_size: int) -> torch.nn.Module:
    """A copy of ``model`` whose attention runs the "flex" backend (the inner
    module holds no parameters, so the weights are shared by value)."""
    from torchtitan_nemotron3.model.attention import DocumentCausalAttention

    model = copy.deepcopy(model)
    cfg = DocumentCausalAttention.Config(backend="flex")
    cfg.flex.block_size = block_size
    for m in model.modules():
        if hasattr(m, "inner_attention"):
            m.inner_attention = cfg.build()
    return model


def flex_worker(rank: int, world: int, rdv: str, L: int) -> None:
    """Flex attention on this rank's shard (K/V gathered into row order, the block
    mask's query rows this rank's segments, global document ids) vs the SDPA
    layer and model on whole rows, forward only (torch has no CPU backward for
    flex), fp64: one attention layer with and without documents, and the whole
    model's forward under CP (global ids and the block mask built in it; Mamba2's
    CP path too). Blocks of 8 tokens straddle the 12-token head-tail segments.
    Rank 0 writes the largest errors as ``flex_errors.json``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{rdv}", rank=rank, world_size=world
    )
    try:
        model = tiny_model()
        flex_model = _with_flex_attention(model, block_size=8)
        g = torch.Generator().manual_seed(3)
        x_BLD = torch.randn(BATCH, L, 16, generator=g, dtype=torch.float64)
        tokens_BL = torch.randint(0, 32, (BATCH, L), generator=g)
        positions_BL = packed_positions(L, L // (2 * world))
        errors: dict = {}
        for load_balanced in (True, False):
            layout = CPLayout(dist.group.WORLD, load_balanced=load_balanced)
            tag = "headtail" if load_balanced else "contiguous"
            idx = layout.global_index(L // world, "cpu")
            for packed in (True, False):
                seq_idx_BL = seq_idx_from_positions(positions_BL) if packed else None
                local_seq_idx = (
                    global_seq_idx(positions_BL[:, idx], layout) if packed else None
                )
                mixer = copy.deepcopy(flex_model.layers["1"].mixer)
                mixer.set_context_parallel(layout)
                with torch.no_grad():
                    ref = model.layers["1"].mixer(x_BLD, seq_idx_BL)[:, idx]
                    got = mixer(x_BLD[:, idx], local_seq_idx)
                name = f"attention/{tag}/{'packed' if packed else 'unpacked'}"
                _check(name, got, ref, errors)
            cp_model = copy.deepcopy(flex_model)
            cp_model.cp_layout = layout
            set_context_parallel(cp_model, layout)
            with torch.no_grad():
                for pos in (positions_BL, None):
                    ref = model(tokens_BL, positions=pos)[:, idx]
                    got = cp_model(
                        tokens_BL[:, idx], positions=None if pos is None else pos[:, idx]
                    )
                    name = f"model/{tag}/{'unpacked' if pos is None else 'packed'}"
                    _check(name, got, ref, errors)
        if rank == 0:
            with open(os.path.join(os.path.dirname(rdv), "flex_errors.json"), "w") as f:
                json.dump(errors, f)
    finally:
        dist.destroy_process_group()
