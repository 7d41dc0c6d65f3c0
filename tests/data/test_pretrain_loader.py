"""The pretraining dataloader: rows, exactly-once serving, resume, data state."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from data_helpers import WordTokenizer

from torchtitan_nemotron3.data.blend import BlendError
from torchtitan_nemotron3.data.pretrain import DataStateError, PretrainDataLoader
from torchtitan_nemotron3.data.sources import SourceError

SEQ = 16


def _corpus(path, n, seed, prefix):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for d in range(n):
            words = [f"{prefix}w{int(x)}" for x in rng.integers(0, 50, rng.integers(3, 40))]
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpora")
    return [_corpus(d / f"{p}.jsonl", n, i, p) for i, (p, n) in enumerate([("a", 120), ("b", 80), ("c", 60)])]


def _loader(blend, *, tokenizer, dp=1, rank=0, batch=2, **kw):
    cfg = PretrainDataLoader.Config(blend=blend, **kw)
    return PretrainDataLoader(cfg, dp_world_size=dp, dp_rank=rank, tokenizer=tokenizer,
                              seq_len=SEQ, local_batch_size=batch)


def _take(loader, n):
    it, out = iter(loader), []
    for _ in range(n):
        out.append(next(it))
    return out


def _hash(inputs, labels, positions):
    h = hashlib.sha1()
    for t in (inputs, labels, positions):
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def test_batch_contract(corpora):
    tok = WordTokenizer()
    (inp, labels), = _take(_loader(f"0.5 {corpora[0]} 0.5 {corpora[1]}", tokenizer=tok, batch=3), 1)
    assert set(inp) == {"input", "positions"}
    for t in (inp["input"], inp["positions"], labels):
        assert t.dtype == torch.long and t.shape == (3, SEQ)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_row_of_an_epoch_once_across_ranks_and_workers(corpora, workers):
    """One source, finite: the rows of 2 ranks × `workers` workers are exactly the
    source's epoch-0 rows (whole global batches), each once."""
    tok = WordTokenizer()
    blend = corpora[0]
    ref_loader = _loader(blend, tokenizer=tok)
    rows = ref_loader.rows.sources[0]
    batch, dp = 2, 2
    n_global = rows.rows_per_epoch // (batch * dp) * batch * dp
    expected = sorted(_hash(*map(torch.from_numpy, rows.row(q)[:3])) for q in range(n_global))
    got = []
    for rank in range(dp):
        loader = _loader(blend, tokenizer=tok, dp=dp, rank=rank, batch=batch,
                         infinite=False, num_workers=workers)
        for inp, labels in loader:
            got += [_hash(inp["input"][i], labels[i], inp["positions"][i]) for i in range(batch)]
    assert len(got) == n_global and sorted(got) == expected


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_uninterrupted_rows(corpora, workers):
    tok = WordTokenizer()
    blend = f"0.5 {corpora[0]} 0.3 {corpora[1]} 0.2 {corpora[2]}"
    full = _take(_loader(blend, tokenizer=tok, num_workers=workers), 12)
    first = _loader(blend, tokenizer=tok, num_workers=workers)
    _take(first, 5)
    state = first.state_dict()
    assert state["consumed_rows"] == 10
    resumed = _loader(blend, tokenizer=tok, num_workers=workers)
    resumed.load_state_dict(state)
    for (a, la), (b, lb) in zip(full[5:], _take(resumed, 7)):
        assert torch.equal(a["input"], b["input"]) and torch.equal(la, lb)
        assert torch.equal(a["positions"], b["positions"])


def test_resume_at_another_data_parallel_size_gives_the_same_global_batches(corpora):
    """Saved at DP=4 (2 rows each), resumed at DP=2 (4 rows each): the same rows
    per global batch, in the same order."""
    tok = WordTokenizer()
    blend = f"0.7 {corpora[0]} 0.3 {corpora[1]}"

    def global_batches(dp, batch, steps, state=None):
        per_rank = []
        for r in range(dp):
            loader = _loader(blend, tokenizer=tok, dp=dp, rank=r, batch=batch)
            if state is not None:
                loader.load_state_dict(state)
            per_rank.append(_take(loader, steps))
        return [torch.cat([per_rank[r][s][0]["input"] for r in range(dp)]) for s in range(steps)], loader

    full, _ = global_batches(4, 2, 6)
    _, saved = global_batches(4, 2, 2)
    state = saved.state_dict()  # any rank's: the same on every rank
    resumed, _ = global_batches(2, 4, 4, state)
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a, b)


def test_changed_data_refused_on_resume_unless_allowed(corpora):
    tok = WordTokenizer()
    old = _loader(f"0.5 {corpora[0]} 0.5 {corpora[1]}", tokenizer=tok)
    _take(old, 2)
    state = old.state_dict()
    new = _loader(f"0.6 {corpora[0]} 0.4 {corpora[1]}", tokenizer=tok)
    with pytest.raises(DataStateError) as e:
        new.load_state_dict(state)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("resume refused: the data differs")
    assert "blend:" in msg and "allow_data_change" in msg
    for change in ({"seed": 5}, {"isolate_documents": False}):
        with pytest.raises(DataStateError, match=list(change)[0]):
            _loader(f"0.5 {corpora[0]} 0.5 {corpora[1]}", tokenizer=tok, **change).load_state_dict(state)
    allowed = _loader(f"0.6 {corpora[0]} 0.4 {corpora[1]}", tokenizer=tok, allow_data_change=True)
    allowed.load_state_dict(state)
    assert allowed.consumed_rows == 4


def test_moved_data_resumes_and_changed_content_is_refused(corpora, tmp_path):
    tok = WordTokenizer()
    old = _loader(f"0.5 {corpora[0]} 0.5 {corpora[1]}", tokenizer=tok)
    _take(old, 2)
    state = old.state_dict()
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for c in corpora[:2]:
        shutil.copy(c, moved)
    blend = f"0.5 {moved / 'a.jsonl'} 0.5 {moved / 'b.jsonl'}"
    resumed = _loader(blend, tokenizer=tok)
    resumed.load_state_dict(state)
    assert resumed.consumed_rows == 4
    with open(moved / "b.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    with pytest.raises(DataStateError, match=r"sources: .*b.jsonl:docs=80.*b.jsonl:docs=81"):
        _loader(blend, tokenizer=tok).load_state_dict(state)


def test_metrics_report_each_source_share_and_epoch(corpora):
    tok = WordTokenizer()
    loader = _loader(f"0.5 {corpora[0]} 0.3 {corpora[1]} 0.2 {corpora[2]}", tokenizer=tok, batch=5)
    _take(loader, 20)
    m = loader.data_metrics()
    assert m["data/a/share"] == 0.5 and m["data/b/share"] == 0.3 and m["data/c/share"] == 0.2
    per_epoch = loader.rows.sources[2].rows_per_epoch
    assert m["data/c/epoch"] == pytest.approx(20 / per_epoch)


def test_held_out_documents_are_disjoint_and_validation_repeats(corpora):
    tok = WordTokenizer()

    def docs(split):
        loader = _loader(corpora[0], tokenizer=tok, valid_fraction=0.2, split=split)
        return set(loader.rows.sources[0].source.docs.tolist()), loader

    train, _ = docs("train")
    valid, vloader = docs("valid")
    assert not train & valid and len(train | valid) == 120 and len(valid) == 24
    vloader = _loader(corpora[0], tokenizer=tok, valid_fraction=0.2, split="valid", infinite=False)
    first = [b[0]["input"] for b in vloader]
    second = [b[0]["input"] for b in vloader]
    assert first and all(torch.equal(a, b) for a, b in zip(first, second))


def test_bad_sources_are_named(tmp_path, corpora):
    tok = WordTokenizer()
    with pytest.raises(SourceError, match=r"^\S*nope_text_document: no such Megatron dataset .*prepare_data.py"):
        _loader(str(tmp_path / "nope_text_document"), tokenizer=tok)
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text('{"text": "one two"}\n')
    with pytest.raises(SourceError, match="tiny.jsonl: empty source: 1 documents, 2 tokens"):
        _loader(f"0.5 {corpora[0]} 0.5 {tiny}", tokenizer=tok)
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"text": "a b"}\n{"body": "c"}\n')
    with pytest.raises(SourceError, match=r"nokey.jsonl:2: no 'text' field"):
        _loader(str(nokey), tokenizer=tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(SourceError, match="bad.jsonl: not UTF-8"):
        _loader(str(bad), tokenizer=tok)
    with pytest.raises(BlendError, match="weight nan"):
        PretrainDataLoader.Config(blend=f"nan {corpora[0]} 1 {corpora[1]}")
    small_vocab = WordTokenizer(vocab=10)
    with pytest.raises(ValueError, match=r"a.jsonl: document \d+ has token id \d+, outside"):
        _take(_loader(corpora[0], tokenizer=small_vocab), 1)


def _write_prefix(prefix, docs, dtype=np.uint16):
    from torchtitan_nemotron3.data.indexed import IndexedDatasetWriter

    with IndexedDatasetWriter(str(prefix), dtype) as w:
        for d in docs:
            w.add_document(np.asarray(d))
        w.commit()
    return str(prefix)


def test_megatron_prefix_rows_are_the_written_documents(tmp_path):
    """A Megatron prefix, unshuffled, isolation off: the rows are the written
    documents' concatenation; on: every label is the next token of its document."""
    from data_helpers import random_docs

    docs = [d % 60000 for d in random_docs(40, seed=4, vocab=1000)]
    prefix = _write_prefix(tmp_path / "web_text_document", docs)
    stream = np.concatenate(docs)
    loader = _loader(prefix, tokenizer=None, batch=1, shuffle=False, isolate_documents=False,
                     vocab_size=60000)
    for r, (inp, labels) in enumerate(_take(loader, 10)):
        window = stream[r * SEQ : r * SEQ + SEQ + 1]
        assert inp["input"][0].tolist() == window[:-1].tolist()
        assert labels[0].tolist() == window[1:].tolist()
    assert loader.rows.names == ["web"]


def test_token_ids_beyond_the_model_vocabulary_name_the_file(tmp_path):
    docs = [np.array([5, 6, 7, 8, 1]), np.array([9, 70000, 3, 1])] * 4
    prefix = _write_prefix(tmp_path / "x_text_document", docs, np.int32)
    loader = _loader(prefix, tokenizer=None, batch=1, shuffle=False, vocab_size=65536)
    with pytest.raises(ValueError) as e:
        _take(loader, 2)
    msg = str(e.value)
    assert msg == (
        f"{prefix}.bin: document 1 has token id 70000, outside the model's vocabulary "
        "[0, 65536) (wrong tokenizer?)"
    )
