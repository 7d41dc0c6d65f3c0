"""The kernel custom ops under FSDP2 (one gloo rank on CPU, bf16 mixed precision, as
TorchTitan applies it): parameters reach the ops as plain all-gathered bf16 tensors,
and the sharded block trains like the sharded torch-path block."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
from _kernel_helpers import build, mamba_args, mamba_inputs
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


from reference_kernels import REFERENCE_CONV, REFERENCE_SSD, use_kernels


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def sharded_step(backend, h_BLD, seq_idx_BL):
    block = build(mamba_args(hybrid_override_pattern="M"), backend).layers["0"]
    fully_shard(
        block,
        mp_policy=MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        ),
    )
    out = block(h_BLD, seq_idx_BL)
    out.float().pow(2).sum().backward()
    return [out.detach().float()] + [
        p.grad.full_tensor() for _, p in block.named_parameters()
    ]


def test_fsdp2_block_with_kernel_ops(one_rank):
    seen = []

    def recording(fn):
        def inner(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            seen.append((any(isinstance(t, DTensor) for t in tensors), args[1].dtype))
            return fn(*args, **kwargs)

        return inner

    ssd = dataclasses.replace(REFERENCE_SSD, fwd=recording(REFERENCE_SSD.fwd))
    conv = dataclasses.replace(REFERENCE_CONV, fwd=recording(REFERENCE_CONV.fwd))
    seq_idx_BL = mamba_inputs(L=40)["seq_idx_BL"]
    h_BLD = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(0))
    reference = sharded_step("torch", h_BLD, seq_idx_BL)
    with use_kernels(ssd=ssd, conv=conv):
        ours = sharded_step("cuda", h_BLD, seq_idx_BL)

    # conv fwd gets (x, weight, ...), the SSD fwd (x, dt, ...): no DTensor, bf16
    assert seen == [(False, torch.bfloat16)] * 2
    for a, b in zip(ours, reference):
        assert a.dtype == b.dtype
        assert ((a - b).norm() / b.norm()) <= 2e-2
