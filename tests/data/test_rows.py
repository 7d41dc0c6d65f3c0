"""A source's packed rows against plain references written from the definitions."""

import numpy as np
import pytest
from data_helpers import MemorySource, random_docs

from torchtitan_nemotron3.data.rows import SourceRows, TokenIdError

L = 16


def _epoch_rows(rows: SourceRows, epoch: int):
    n = rows.rows_per_epoch
    return [rows.row(epoch * n + r) for r in range(n)]


def test_isolated_rows_follow_the_definition():
    docs = random_docs(60, max_len=40) + [np.array([1])]  # a 1-token doc gives no pair
    src = MemorySource(docs)
    rows = SourceRows(src, seq_len=L, seed=3, isolate_documents=True)
    assert rows.rows_per_epoch == sum(len(d) - 1 for d in docs) // L
    for epoch in (0, 1):
        got = _epoch_rows(rows, epoch)
        order = [p[0] for _, _, _, pieces in got for p in pieces]
        # reference: the (input, label, document) pairs of the documents in the
        # order the rows use, cut every L pairs
        seen = list(dict.fromkeys(order))
        pairs = [(t[i], t[i + 1], d) for d in seen for t in [docs[d]] for i in range(len(t) - 1)]
        for r, (inputs, labels, positions, _) in enumerate(got):
            chunk = pairs[r * L : (r + 1) * L]
            assert list(inputs) == [p[0] for p in chunk]
            assert list(labels) == [p[1] for p in chunk]
            # no label crosses a document: ids carry their document (d*1000 + k)
            doc_of = [p[2] for p in chunk]
            assert all(lab == 1 or lab // 1000 == d for lab, d in zip(labels, doc_of))
            # positions restart at each document and at the row start
            expected = [0 if i == 0 or doc_of[i] != doc_of[i - 1] else None for i in range(L)]
            for i in range(L):
                if expected[i] is None:
                    expected[i] = expected[i - 1] + 1
            assert list(positions) == expected
        # every document of the epoch is used once, contributing n-1 pairs
        served = np.bincount([d for _, _, _, pieces in got for d, _, k in pieces for _ in range(k)],
                             minlength=len(docs))
        full = [d for d in seen[:-1]]  # all but the last (possibly cut) document
        assert all(served[d] == len(docs[d]) - 1 for d in full)
    # the shuffle differs between epochs and seeds, and is a permutation
    first = [p[0] for _, _, _, pieces in _epoch_rows(rows, 0) for p in pieces]
    second = [p[0] for _, _, _, pieces in _epoch_rows(rows, 1) for p in pieces]
    assert first[:20] != second[:20]


def test_unisolated_rows_are_windows_of_the_eos_separated_stream():
    docs = random_docs(50, seed=1)
    src = MemorySource(docs)
    rows = SourceRows(src, seq_len=L, seed=7, isolate_documents=False)
    stream_len = sum(map(len, docs))
    assert rows.rows_per_epoch == (stream_len - 1) // L
    order, _ = rows._epoch(0)
    stream = np.concatenate([docs[d] for d in order])  # EOS ends every document
    for r in range(rows.rows_per_epoch):
        inputs, labels, positions, _ = rows.row(r)
        window = stream[r * L : r * L + L + 1]
        assert np.array_equal(inputs, window[:-1]) and np.array_equal(labels, window[1:])
        assert np.array_equal(positions, np.arange(L))
    # EOS -> next document's first token is a trained pair here (NVIDIA's stream)
    assert any(
        (inputs == 1).any() for inputs, *_ in _epoch_rows(rows, 0)[:-1]
    )


def test_unshuffled_order_and_order_independent_of_weights():
    docs = random_docs(10, seed=2)
    rows = SourceRows(MemorySource(docs), seq_len=4, seed=0, shuffle=False)
    inputs = np.concatenate([rows.row(q)[0] for q in range(rows.rows_per_epoch)])
    ref = np.concatenate([d[:-1] for d in docs])[: len(inputs)]
    assert np.array_equal(inputs, ref)


def test_token_id_outside_vocabulary_names_file_and_document():
    docs = [np.array([5, 6, 7, 1]), np.array([8, 5000, 9, 1])]
    rows = SourceRows(MemorySource(docs, name="data/web_text_document"), seq_len=6,
                      seed=0, shuffle=False, vocab_size=4096)
    with pytest.raises(TokenIdError) as e:
        rows.row(0)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("data/web_text_document: document 1 has token id 5000")
    assert "[0, 4096)" in msg
