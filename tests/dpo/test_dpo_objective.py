"""The DPO objective's pieces against plain references: per-token log-probs by
chunks, per-reply sums over packed rows, the loss and rewards from the definition;
the reference policy (adapters off = precomputed, bitwise); packed = unpacked."""

import math

import pytest
import torch
import torch.nn.functional as F

from lora.lora_testing import args_for_test, base_and_lora

from torchtitan_nemotron3.dpo.data import PAIR_KEY, SEGMENT_KEY, PairDocuments, pair_row
from torchtitan_nemotron3.dpo.loss import (
    dpo_terms,
    reply_logps,
    slot_values,
    token_logps,
)
from torchtitan_nemotron3.dpo.reference import ReferenceTable, adapters_off
from torchtitan_nemotron3.sft.packing import IGNORE_INDEX, make_document


def test_token_logps_by_chunks_equal_full_log_softmax_with_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    h = torch.randn(2, 13, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 13))
    labels[0, :4] = IGNORE_INDEX
    got = token_logps(h, head, labels, chunk_len=5)  # 13 = 5 + 5 + 3
    full = F.log_softmax(head(h).float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    want = torch.where(labels != IGNORE_INDEX, full, 0.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    g = torch.randn(2, 13)
    (dh,) = torch.autograd.grad((got * g).sum(), h)
    (dh_ref,) = torch.autograd.grad((want * g).sum(), h)
    torch.testing.assert_close(dh, dh_ref, rtol=1e-5, atol=1e-7)


def test_reply_sums_and_slots_follow_the_segments():
    """Two rows of packed pairs: each slot's sum is a plain loop's over its tokens."""
    g = torch.Generator().manual_seed(1)
    L = 12
    segment = torch.tensor(
        [
            [-1, 0, 0, -1, 1, -1, 2, 2, 2, -1, 3, -1],
            [-1, -1, 0, 0, 0, -1, 1, 1, -1, -1, -1, -1],
        ]
    )
    pair = torch.where(segment >= 0, 100 + segment // 2 + 10 * torch.arange(2)[:, None], -1)
    logp = torch.randn(2, L, generator=g)
    sums, counts = reply_logps(logp, segment)
    slots = slot_values(pair, segment)
    for b in range(2):
        for k in range(L // 2):
            for side in range(2):
                mask = segment[b] == 2 * k + side
                assert counts[b, k, side] == int(mask.sum())
                assert torch.allclose(sums[b, k, side], logp[b][mask].sum())
                want = 100 + k + 10 * b if mask.any() else -1
                assert slots[b, k, side] == want


def test_terms_from_the_definition():
    policy = torch.tensor([[-10.0, -12.0], [-5.0, -4.0], [-7.0, -7.5]])
    reference = torch.tensor([[-11.0, -11.0], [-5.5, -4.5], [-7.0, -7.0]])
    n_chosen = torch.tensor([4, 2, 5])
    beta, w = 0.25, 0.5
    terms = dpo_terms(policy, reference, n_chosen, beta=beta, nll_weight=w)
    for i in range(3):
        (pc, pr), (rc, rr) = policy[i].tolist(), reference[i].tolist()
        z = beta * ((pc - rc) - (pr - rr))
        want = -math.log(1 / (1 + math.exp(-z))) + w * (-pc / n_chosen[i].item())
        assert terms.loss[i].item() == pytest.approx(want, rel=1e-6)
        assert terms.chosen_reward[i].item() == pytest.approx(beta * (pc - rc))
        assert terms.rejected_reward[i].item() == pytest.approx(beta * (pr - rr))
    assert terms.accuracy.tolist() == [1.0, 0.0, 1.0]  # pair 2: a tie
    # at the reference itself: ln 2, margin 0, accuracy 0 (rewards tie)
    at_start = dpo_terms(reference, reference, n_chosen, beta=beta)
    assert torch.allclose(at_start.loss, torch.full((3,), math.log(2)))
    assert at_start.margin.abs().max() == 0 and at_start.accuracy.sum() == 0


def _pairs(args, seed: int, n: int):
    """n pairs of (prompt, chosen, rejected) random token lists."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lens = torch.randint(2, 7, (3,), generator=g).tolist()
        p, c, r = (torch.randint(3, args.vocab_size, (k,), generator=g).tolist() for k in lens)
        docs = []
        for reply in (c, r):
            doc, _ = make_document(p + reply, [False] * len(p) + [True] * len(reply), 64, "drop")
            docs.append(doc)
        out.append(PairDocuments(i, *docs))
    return out


def _sequence_logps(model, rows):
    """[pairs, 2] sums over rows (each a list of PairDocuments)."""
    out = []
    for docs in rows:
        row, labels = pair_row(docs, seq_len=96, pad_id=0)
        segment = row.pop(SEGMENT_KEY)[None]
        row.pop(PAIR_KEY)
        logits = model(row["input"][None], positions=row["positions"][None])
        sums, counts = reply_logps(token_logps(logits, torch.nn.Identity(), labels[None]), segment)
        out.append(sums[counts[..., 0] > 0])
    return torch.cat(out)


def test_packed_pairs_equal_unpacked():
    """Several pairs in one row (positions restarting per document) give each
    reply the log-probability it has alone in its own row."""
    args = args_for_test(0)
    _, model = base_and_lora(args)
    pairs = _pairs(args, 0, 4)
    with torch.no_grad():
        packed = _sequence_logps(model, [pairs])
        alone = _sequence_logps(model, [[p] for p in pairs])
    assert packed.shape == (4, 2)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_adapters_off_is_the_base_and_equals_the_precomputed_table(tmp_path):
    """With trained (non-zero) adapters, "adapters off" is the base model's
    log-probability; at B = 0 it is the policy's, bitwise; a table computed from it
    and saved/loaded gives back the same bits."""
    args = args_for_test(1)
    base, lora = base_and_lora(args, seed=1)
    pairs = _pairs(args, 1, 3)
    with torch.no_grad():
        at_start = _sequence_logps(lora, [pairs])
        with adapters_off(lora):
            off_at_start = _sequence_logps(lora, [pairs])
        assert torch.equal(at_start, off_at_start)
        table = ReferenceTable(off_at_start.clone(), "fp")
        table.save(str(tmp_path / "train.safetensors"))
        loaded = ReferenceTable.load(str(tmp_path / "train.safetensors"), "fp")
        row, _ = pair_row(pairs, seq_len=96, pad_id=0)
        looked_up = loaded.lookup(slot_values(row[PAIR_KEY][None], row[SEGMENT_KEY][None]))
        assert torch.equal(looked_up[0, :3], off_at_start)
        # move the adapters: the policy changes, adapters-off stays the base model
        for name, p in lora.named_parameters():
            if ".lora_b." in name:
                p.normal_(0, 0.5)
        moved = _sequence_logps(lora, [pairs])
        with adapters_off(lora):
            off = _sequence_logps(lora, [pairs])
        assert (moved - at_start).abs().max() > 1e-3
        torch.testing.assert_close(off, _sequence_logps(base, [pairs]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="other data"):
        ReferenceTable.load(str(tmp_path / "train.safetensors"), "another")


def test_adapters_off_without_adapters_is_refused():
    args = args_for_test(0)
    base, _ = base_and_lora(args)
    with pytest.raises(ValueError, match="needs LoRA adapters"):
        with adapters_off(base):
            pass
