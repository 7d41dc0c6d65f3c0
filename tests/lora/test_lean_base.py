"""LoRA with a lean base: the frozen base is stored in the compute dtype (never an
fp32 master copy) with no gradient and no optimizer state; the dry run sizes LoRA
and QLoRA jobs as they run. The full fine-tune's figures stay as they were."""

import pytest
import torch
from torch.distributed.tensor import DTensor

from torchtitan_nemotron3.dry_run import build_sharded, dry_run, job_from_args, parse_args

GiB = 2**30


def _job(*argv):
    return job_from_args(parse_args(list(argv)))


def test_parallelize_stores_the_frozen_base_in_bf16_and_adapters_in_fp32():
    """The package's real parallelize (fake world, meta): every frozen parameter
    but the fp32 router gate is bf16; every adapter is an fp32 master weight."""
    job = _job("--flavor", "debugmodel", "--ngpu", "2", "--seq_len", "64",
               "--lora_rank", "4")  # fmt: skip
    model, _, _ = build_sharded(job)
    torch.distributed.destroy_process_group()
    seen = {"adapter": 0, "frozen": 0, "gate": 0}
    for name, p in model.named_parameters():
        assert isinstance(p, DTensor), name  # FSDP2 over 2 ranks
        if p.requires_grad:
            assert ".lora_a." in name or ".lora_b." in name, name
            assert p.dtype == torch.float32, name
            seen["adapter"] += 1
        elif ".router.gate." in name:
            assert p.dtype == torch.float32, name
            seen["gate"] += 1
        else:
            assert p.dtype == torch.bfloat16, name
            seen["frozen"] += 1
    assert all(seen.values()), seen


def test_full_fine_tune_keeps_fp32_master_weights():
    model, _, _ = build_sharded(_job("--flavor", "debugmodel", "--ngpu", "2"))
    torch.distributed.destroy_process_group()
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_nano_bf16_lora_seq8192_fits_one_80gb_gpu():
    """Nano LoRA on one GPU at seq 8192 (full AC): 58.8 GiB bf16 base, adapters
    pay fp32 weight + grad + 2 moments, total <= 70 GiB (was 498.9 GiB)."""
    r = dry_run(_job("--config", "train_configs/nemotron3-nano-30B-lora.toml",
                     "--ngpu", "1", "--ep", "1", "--ac", "full"))  # fmt: skip
    sh, m = r.shards, r.memory
    trainable = sum(sh.trainable_numel.values())
    assert 30e6 < trainable < 40e6  # r=32 on the default targets
    assert abs(sh.frozen_by_dtype["bfloat16"] / GiB - 58.8) < 0.05
    assert m.grads == 4 * trainable and m.optimizer == 8 * trainable
    print(f"Nano bf16 LoRA seq 8192 full AC, 1 GPU: {m.total / GiB:.1f} GiB")
    assert m.total / GiB <= 70


def test_nano_qlora_seq4096_fits_22_gib():
    """Nano QLoRA (NF4 linears, experts and lm_head, r=16, full AC, seq 4096)."""
    r = dry_run(_job("--flavor", "nano-30B", "--ngpu", "1", "--ep", "1",
                     "--ac", "full", "--seq_len", "4096", "--lora_rank", "16",
                     "--base_dtype", "nf4", "--nf4_lm_head"))  # fmt: skip
    sh, m = r.shards, r.memory
    assert abs(sum(sh.frozen_by_dtype.values()) / GiB - 15.7) < 0.05
    assert sh.frozen_by_dtype["nf4"] > 14 * GiB
    assert m.dequant == 128 * 1856 * 2688 * 2  # one layer's expert bank, bf16
    print(f"Nano QLoRA seq 4096 full AC, 1 GPU: {m.total / GiB:.1f} GiB")
    assert m.total / GiB <= 22


def test_base_dtype_needs_lora():
    with pytest.raises(ValueError, match="need a LoRA job"):
        _job("--flavor", "debugmodel", "--base_dtype", "nf4")


def test_nano_qlora_job_file_fits_22_gib():
    """train_configs/nemotron3-nano-30B-qlora.toml as written (one GPU)."""
    r = dry_run(_job("--config", "train_configs/nemotron3-nano-30B-qlora.toml",
                     "--ngpu", "1"))  # fmt: skip
    assert r.job.ac == "full" and r.job.training.seq_len == 4096
    assert r.shards.frozen_by_dtype["nf4"] > 14 * GiB
    assert r.memory.total / GiB <= 22


def test_nano_qlora_on_8_ranks_stores_an_eighth_of_the_nf4_base():
    """FSDP-QLoRA in the dry run (the package's parallelize on a fake world of 8):
    each rank stores 1/8 of the one-rank NF4 bytes (every Nano target splits
    into whole blocks at dp 8; nothing replicated), the all-gather buffer
    holds NF4 units at their NF4 bytes (less than one layer's bf16 expert
    bank), and only the adapters' gradients are reduce-scattered."""
    argv = ["--flavor", "nano-30B", "--ep", "1", "--ac", "full", "--seq_len", "4096",
            "--lora_rank", "16", "--base_dtype", "nf4", "--nf4_lm_head"]  # fmt: skip
    one = dry_run(_job(*argv, "--ngpu", "1"))
    eight = dry_run(_job(*argv, "--ngpu", "8"))
    nf4_1, nf4_8 = one.shards.frozen_by_dtype["nf4"], eight.shards.frozen_by_dtype["nf4"]
    print(
        f"Nano QLoRA NF4 per rank: {nf4_1 / GiB:.2f} GiB on 1, {nf4_8 / GiB:.3f} GiB "
        f"on 8; total {one.memory.total / GiB:.2f} / {eight.memory.total / GiB:.2f} GiB"
    )
    assert abs(nf4_8 * 8 / nf4_1 - 1) < 1e-3 and eight.shards.nf4_replicated == 0
    assert 0 < eight.memory.gather < 128 * 1856 * 2688 * 2
    trainable = sum(eight.shards.trainable_numel.values())
    rs = sum(b for d, what, b in eight.traffic.rows if what.startswith("reduce-scatter"))
    assert rs == int(trainable * 8 * 4 * 7 / 8)  # all 8 shards' adapters, fp32, ring
    assert eight.memory.total < one.memory.total - 0.85 * (nf4_1 - nf4_8)
