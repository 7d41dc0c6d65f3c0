"""Configs and builders shared by the kernel-path tests (fixtures: ``conftest.py``)."""

import torch
from nemotron_testing import build_model

from torchtitan_nemotron3.model import NemotronHArgs


def mamba_args(**overrides) -> NemotronHArgs:
    """A small NemotronH with Mamba layers whose conv width (8·... channels) the
    kernels accept: d_inner 64, 2 groups of state 16, chunk 16."""
    values = {
        "vocab_size": 64,
        "hidden_size": 32,
        "hybrid_override_pattern": "M*ME",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "mamba_num_heads": 4,
        "mamba_head_dim": 16,
        "ssm_state_size": 16,
        "n_groups": 2,
        "chunk_size": 16,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "moe_shared_expert_intermediate_size": 24,
        "intermediate_size": 32,
    }
    values.update(overrides)
    return NemotronHArgs(**values)


def build(
    args: NemotronHArgs,
    kernel_backend: str | None = None,
    seed: int = 0,
    dtype=torch.float32,
):
    """Our model on CPU, initialised from scratch; ``kernel_backend=None`` takes the default."""
    model = build_model(args, seed=seed, kernel_backend=kernel_backend)
    with torch.no_grad():
        # Non-trivial D and dt_bias so those paths matter.
        for name, p in model.named_parameters():
            if name.endswith((".D", ".dt_bias")):
                p.add_(0.5 * torch.randn_like(p))
    return model.to(dtype)


def packed_positions(batch: int, lengths: list[int]) -> torch.Tensor:
    """Positions of rows that pack documents of ``lengths`` (restarting at 0)."""
    row = torch.cat([torch.arange(n) for n in lengths])
    return row[None].expand(batch, -1).contiguous()


def mamba_inputs(
    Bsz=2, L=40, H=4, P=16, G=2, N=16, dtype=torch.float32, packed=True, seed=0
) -> dict:
    """Inputs to ``MambaOps.scan``/``conv`` laid out as the mixer makes them: slices
    of one in_proj-like buffer (so strided, as in the model)."""
    g = torch.Generator().manual_seed(seed)
    d_inner, GN = H * P, G * N
    conv_dim = d_inner + 2 * GN
    proj = torch.randn(Bsz, L, d_inner + conv_dim + H, generator=g).to(dtype)
    _z, xBC, dt = proj.split([d_inner, conv_dim, H], dim=-1)
    x, B, C = xBC.split([d_inner, GN, GN], dim=-1)
    seq_idx = None
    if packed:
        # documents of 1 token, starting on a chunk boundary (16), at any place
        starts = torch.zeros(Bsz, L, dtype=torch.int32)
        starts[0, [p for p in (7, 23) if p < L]] = 1
        starts[-1, [p for p in (16, 17, 33) if p < L]] = 1
        seq_idx = torch.cumsum(starts, dim=1, dtype=torch.int32)
    return {
        "xBC_BLX": xBC,
        "weight_XK": (0.5 * torch.randn(conv_dim, 4, generator=g)).to(dtype),
        "bias_X": (0.1 * torch.randn(conv_dim, generator=g)).to(dtype),
        "x_BLHP": x.unflatten(-1, (H, P)),
        "dt_BLH": dt,
        "A_H": -torch.rand(H, generator=g) * 4 - 0.5,
        "B_BLGN": B.unflatten(-1, (G, N)),
        "C_BLGN": C.unflatten(-1, (G, N)),
        "D_H": torch.randn(H, generator=g).to(dtype),
        "dt_bias_H": (torch.randn(H, generator=g) * 0.5 - 2).to(dtype),
        "seq_idx_BL": seq_idx,
    }
