"""Packed rows: documents intact, positions restarting at each conversation (the
model's document boundaries), padding apart, too-long conversations dropped or
truncated and counted, and a resumed loader continuing exactly."""

import pytest
import torch

from torchtitan_nemotron3.model.model import seq_idx_from_positions
from torchtitan_nemotron3.sft import ChatSFTDataLoader, Document, Packer, make_document
from torchtitan_nemotron3.sft.assets import ensure_debug_sft_assets


def test_rows_keep_documents_whole_and_restart_positions():
    rng = torch.Generator().manual_seed(0)
    docs = []
    for i in range(40):
        n = int(torch.randint(5, 60, (1,), generator=rng))
        docs.append(Document([1000 * i + j for j in range(n)], [i] * n))
    packer = Packer(64, pad_id=-1, window=8)
    rows = []
    for d in docs:
        packer.add(d)
        while packer.ready():
            rows.append(packer.pop_row())
    while packer.pool:
        rows.append(packer.pop_row())
    found = []
    for inputs, labels, positions in rows:
        assert len(inputs) == len(labels) == len(positions) == 64
        seq_idx = seq_idx_from_positions(torch.tensor([positions]))[0].tolist()
        for s in sorted(set(seq_idx)):
            idx = [k for k, v in enumerate(seq_idx) if v == s]
            piece = [inputs[k] for k in idx]
            assert [positions[k] for k in idx] == list(range(len(idx)))
            if piece[0] == -1:  # padding: its own document, never trained
                assert all(labels[k] == -100 for k in idx)
            else:
                found.append(piece[0] // 1000)
                assert piece == docs[found[-1]].inputs
    assert sorted(found) == list(range(40))  # every document once
    stats = packer.stats
    assert stats.tokens == sum(len(d) for d in docs)
    assert stats.tokens / (stats.rows * 64) > 0.9, stats.line()
    assert "packing efficiency" in stats.line()


def test_overflow_drop_and_truncate():
    tokens, trained = list(range(20)), [False] * 10 + [True] * 10
    assert make_document(tokens, trained, 8, "drop") == (None, "longer than seq_len")
    assert make_document(tokens, trained, 8, "truncate") == (
        None,
        "no assistant token within seq_len",
    )
    doc, note = make_document(tokens, trained, 12, "truncate")
    assert note == "truncated" and doc.inputs == list(range(12))
    assert doc.labels == [-100] * 9 + [10, 11, 12]


@pytest.fixture(scope="module")
def tokenizer():
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    return HuggingFaceTokenizer(tokenizer_path=ensure_debug_sft_assets()[0])


def _loader(tokenizer, **kw):
    config = ChatSFTDataLoader.Config(dataset_path=ensure_debug_sft_assets()[1], **kw)
    return ChatSFTDataLoader(
        config, dp_world_size=1, dp_rank=0, tokenizer=tokenizer, seq_len=96,
        local_batch_size=2,
    )  # fmt: skip


def test_too_long_conversations_are_counted(tokenizer):
    for overflow in ("drop", "truncate"):
        loader = _loader(tokenizer, overflow=overflow)
        it = iter(loader)
        for _ in range(10):
            next(it)
        stats = loader.dataset.packer.stats
        if overflow == "drop":
            assert (
                stats.dropped.get("longer than seq_len", 0) > 0 and stats.truncated == 0
            )
        else:
            assert stats.truncated > 0
        assert f"truncated {stats.truncated}" in stats.line()


def test_resume_continues_exactly(tokenizer):
    """The loader's state after 3 batches (rows read, epoch, the packer's pending
    conversations) gives the same next batches as the uninterrupted loader."""
    loader = _loader(tokenizer)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(3)]
    resumed = _loader(tokenizer)
    resumed.load_state_dict(state)
    got = [b for _, b in zip(range(3), resumed)]
    for (x, y), (xr, yr) in zip(expected, got):
        assert torch.equal(x["input"], xr["input"]) and torch.equal(y, yr)
        assert torch.equal(x["positions"], xr["positions"])
