"""The loss is the mean over the assistant tokens of the global batch: one rank with
batch 4, two ranks with batch 2 each, and gradient accumulation 2 x batch 2 give the
same loss and gradients (fp32, <= 1e-6).

In-process, the trainer's arithmetic with TorchTitan 0.3.0's own pieces: the
``global_valid_tokens`` of ``Trainer.train_step`` (labels that are not -100, summed
over micro-batches and data-parallel ranks), TorchTitan's ``CrossEntropyLoss``
(summed cross-entropy / global_valid_tokens), gradients summed over ranks (FSDP's
division is disabled by TorchTitan's ``disable_fsdp_gradient_division``, as ours
calls it through ``apply_fsdp_to_decoder``) and over micro-batches (backward
accumulates). The rows are real packed rows of the debug chat data and the model
is the debug model. The integration test below checks the same through
``run_train.sh`` with 1 and 2 processes.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from _harness import run_training
from nemotron_testing import build_model
from torchtitan.components.loss import CrossEntropyLoss

from torchtitan_nemotron3.model import flavor_args
from torchtitan_nemotron3.sft import ChatSFTDataLoader
from torchtitan_nemotron3.sft.assets import ensure_debug_sft_assets


@pytest.fixture(scope="module")
def batch():
    """4 packed rows of 64 tokens (the first batch of the debug chat data)."""
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    tokenizer_dir, chat_dir = ensure_debug_sft_assets()
    config = ChatSFTDataLoader.Config(dataset_path=chat_dir, overflow="truncate")
    loader = ChatSFTDataLoader(
        config, dp_world_size=1, dp_rank=0, seq_len=64, local_batch_size=4,
        tokenizer=HuggingFaceTokenizer(tokenizer_path=tokenizer_dir),
    )  # fmt: skip
    x, y = next(iter(loader))
    return x["input"], x["positions"], y


def _step(model, groups):
    """``groups[rank][microbatch] = row indices``: (logged loss, gradients) as the
    trainer computes them."""
    inputs, positions, labels = _step.batch
    loss_fn = CrossEntropyLoss(CrossEntropyLoss.Config())
    model.zero_grad()
    rows = [r for rank in groups for mb in rank for r in mb]
    global_valid_tokens = (labels[rows] != -100).sum()
    total = torch.zeros(())
    for rank in groups:
        for mb in rank:
            pred = model(inputs[mb], positions=positions[mb])
            loss, _ = loss_fn(pred, labels[mb], global_valid_tokens)
            loss.backward()
            total += loss.detach()
    grads = {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }
    return total, grads


def test_one_rank_two_ranks_and_accumulation_agree(batch):
    _step.batch = batch
    inputs, positions, labels = batch
    model = build_model(flavor_args("debugmodel"), seed=0, dtype=torch.float32)
    ref_loss, ref_grads = _step(model, [[[0, 1, 2, 3]]])  # 1 rank, batch 4
    two_ranks = _step(model, [[[0, 1]], [[2, 3]]])  # 2 ranks, batch 2 each
    accumulation = _step(model, [[[0, 1], [2, 3]]])  # 1 rank, 2 micro-batches of 2

    with torch.no_grad():  # independent: mean CE over the assistant tokens
        logits = model(inputs, positions=positions).float()
        mask = labels != -100
        mean_ce = F.cross_entropy(logits[mask], labels[mask], reduction="mean")
    assert abs(ref_loss - mean_ce) <= 1e-6 * mean_ce
    assert mask.sum() < 0.8 * mask.numel()  # prompts and padding are masked

    for loss, grads in (two_ranks, accumulation):
        assert abs(loss - ref_loss) <= 1e-6 * ref_loss
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            # ‖Δ‖/‖g‖ per tensor: a wrong denominator is off by a ratio of token
            # counts (>= 1e-2). fp32 rounding of the three summation orders
            # reached 1.5e-6 here (A_log, whose gradient sums every token; a
            # 2-core Xeon, 2026-12-02), so 1e-6 is out of fp32's reach.
            ref = ref_grads[name]
            rel = (g - ref).norm() / ref.norm().clamp_min(1e-30)
            assert rel <= 1e-5, (name, rel)

    # What the normalisation prevents: a per-micro-batch mean weighs the tokens of a
    # micro-batch with few assistant tokens more, and differs.
    per_mb = []
    for mb in ([0, 1], [2, 3]):
        m = labels[mb] != -100
        per_mb.append(F.cross_entropy(logits[mb][m], labels[mb][m], reduction="mean"))
    assert abs(sum(per_mb) / 2 - mean_ce) > 1e-4


def test_packed_conversations_do_not_see_each_other():
    """A packed row's per-token losses equal those of each conversation run alone:
    the restarting positions keep Mamba2 states and attention inside a
    conversation, so packing changes nothing but the padding."""
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    tokenizer_dir, chat_dir = ensure_debug_sft_assets()
    loader = ChatSFTDataLoader(
        ChatSFTDataLoader.Config(dataset_path=chat_dir),
        dp_world_size=1, dp_rank=0, seq_len=256, local_batch_size=1,
        tokenizer=HuggingFaceTokenizer(tokenizer_path=tokenizer_dir),
    )  # fmt: skip
    x, _ = next(iter(loader))
    inputs, positions = x["input"][0], x["positions"][0]
    starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
    assert len(starts) >= 4  # at least 2 conversations and the padding
    model = build_model(flavor_args("debugmodel"), seed=0, dtype=torch.float32)
    with torch.no_grad():
        packed = model(inputs[None], positions=positions[None])[0]
        for s, e in itertools.pairwise(starts):
            alone = model(inputs[None, s:e], positions=positions[None, s:e])[0]
            torch.testing.assert_close(packed[s:e], alone, atol=2e-5, rtol=1e-5)


SFT_TOML = """\
[job]
config = "nemotron3_debug_sft"

[training]
seq_len = 128
steps = 2
mixed_precision_param = "float32"

[dataloader]
packing = false          # one conversation per row: every layout trains the same rows

[validator]
enable = false

[debug]
seed = 0
"""


@pytest.mark.integration
def test_through_the_trainer_one_and_two_processes(tmp_path):
    """run_train.sh, fp32: 1 process with batch 4 against 2 processes with batch 2
    each (data-parallel replicas, so both start from the same seeded weights: CPU
    ranks cannot draw a sharded initialisation equal to the whole one). Without
    packing the step's 4 rows are the same conversations in both (rank r reads rows
    r, r+2, ...). Losses agree at the log's precision, step 2's too, which depends
    on step 1's gradients. (Accumulation = one process: the in-process test.)"""
    toml = tmp_path / "sft.toml"
    toml.write_text(SFT_TOML)
    one = run_training(toml, 1, ["--training.local_batch_size", "4"], tmp_path / "one")
    two = run_training(
        toml, 2,
        ["--training.local_batch_size", "2", "--parallelism.data_parallel_replicate_degree", "2",
         "--parallelism.data_parallel_shard_degree", "1"],
        tmp_path / "two",
    )  # fmt: skip
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert abs(a - b) <= 2e-5 * a, (one, two)
