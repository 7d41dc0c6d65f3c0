"""Megatron's indexed dataset: our reader and writer against megatron-core's own builder
and reader (the independent reference), byte for byte, and every bad file refused in
one line naming it."""

import os
import pickle
import struct
import warnings

import numpy as np
import pytest
import torch

from torchtitan_nemotron3.data.indexed import (
    DataFileError,
    IndexedDataset,
    IndexedDatasetWriter,
    optimal_dtype,
)


@pytest.fixture(scope="module")
def mcore():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def random_docs(n, vocab, seed, max_len=300):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len, n)
    lengths[:3] = (1, 0, max_len)  # a one-token and an empty document among them
    return [rng.integers(0, vocab, k, dtype=np.int64) for k in lengths]


def write_ours(prefix, docs, dtype):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)
    return str(prefix)


def write_megatron(mcore, prefix, docs, dtype, split=None, multimodal=False):
    """megatron-core's builder; ``split(doc) -> lengths`` makes multi-sequence documents."""
    b = mcore.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype, multimodal=multimodal)
    for k, d in enumerate(docs):
        if split is None and not multimodal:
            b.add_item(torch.from_numpy(d))
            b.end_document()
        else:
            lengths = split(d) if split else [len(d)]
            modes = [k % 3] * len(lengths) if multimodal else None
            b.add_document(torch.from_numpy(d), lengths, modes)
    b.finalize(f"{prefix}.idx")
    return str(prefix)


def sentence_split(d):
    """Cut a document into up to four sequences (some empty), deterministically."""
    cuts = sorted({0, len(d), len(d) // 3, len(d) // 3, (2 * len(d)) // 3})
    return list(np.diff(cuts)) or [0]


@pytest.mark.parametrize("vocab", [131_072, 2048])
def test_round_trip(tmp_path, vocab):
    docs = random_docs(1000, vocab, seed=vocab)
    dtype = optimal_dtype(vocab)
    ds = IndexedDataset(write_ours(tmp_path / "ds", docs, dtype))
    assert ds.dtype == dtype and len(ds) == len(docs)
    assert ds.num_tokens == sum(len(d) for d in docs)
    assert ds.doc_lengths.dtype == np.int64
    assert ds.doc_lengths.tolist() == [len(d) for d in docs]
    for k, d in enumerate(docs):
        got = ds[k]
        assert got.dtype == dtype and np.array_equal(got, d)
    assert int(max(d.max() for d in docs if len(d))) > (65535 if vocab > 65536 else 2000)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_optimal_dtype_is_megatrons(mcore):
    for vocab in (256, 2048, 65_499, 65_500, 65_536, 131_072):
        assert optimal_dtype(vocab) == np.dtype(mcore.DType.optimal_dtype(vocab)), vocab
    assert optimal_dtype(131_072) == np.int32 and optimal_dtype(2048) == np.uint16


@pytest.mark.parametrize("vocab", [131_072, 2048])
def test_megatron_builder_to_our_reader(tmp_path, mcore, vocab):
    docs = random_docs(300, vocab, seed=1)
    dtype = optimal_dtype(vocab).type
    ds = IndexedDataset(write_megatron(mcore, tmp_path / "mg", docs, dtype))
    assert len(ds) == len(docs)
    for k, d in enumerate(docs):
        assert np.array_equal(ds[k], d)


@pytest.mark.parametrize("vocab", [131_072, 2048])
def test_our_writer_to_megatron_reader_byte_identical(tmp_path, mcore, vocab):
    docs = random_docs(300, vocab, seed=2)
    dtype = optimal_dtype(vocab)
    ours = write_ours(tmp_path / "ours", docs, dtype)
    ref = mcore.IndexedDataset(ours)
    assert len(ref) == len(docs)  # megatron's length: sequences (one per document here)
    assert ref.index.dtype == dtype.type
    assert np.array_equal(ref.document_indices, np.arange(len(docs) + 1))
    for k, d in enumerate(docs):
        assert np.array_equal(ref[k], d)
    theirs = write_megatron(mcore, tmp_path / "theirs", docs, dtype.type)
    for ext in (".idx", ".bin"):
        with open(ours + ext, "rb") as a, open(theirs + ext, "rb") as b:
            assert a.read() == b.read(), ext


def test_multi_sequence_documents(tmp_path, mcore):
    """Sentence-split files: a document is several sequences (document_indices is not
    arange); read as whole documents, both ways, and written byte-identically."""
    docs = random_docs(200, 131_072, seed=3)
    theirs = write_megatron(mcore, tmp_path / "theirs", docs, np.int32, split=sentence_split)
    ds = IndexedDataset(theirs)
    assert len(ds.sequence_lengths) > len(docs)
    assert not np.array_equal(ds.document_indices, np.arange(len(docs) + 1))
    assert len(ds) == len(docs)
    for k, d in enumerate(docs):
        assert np.array_equal(ds[k], d)
        if len(d) > 5:
            assert np.array_equal(ds.tokens(k, 2, len(d) - 4), d[2:-2])
    with IndexedDatasetWriter(tmp_path / "ours", np.int32) as w:
        for d in docs:
            w.add_document(d, sequence_lengths=sentence_split(d))
    for ext in (".idx", ".bin"):
        with open(f"{tmp_path}/ours{ext}", "rb") as a, open(theirs + ext, "rb") as b:
            assert a.read() == b.read(), ext
    ref = mcore.IndexedDataset(f"{tmp_path}/ours")
    for k, d in enumerate(docs):
        lo, hi = ref.document_indices[k], ref.document_indices[k + 1]
        got = [ref[int(s)] for s in range(lo, hi)]
        assert np.array_equal(np.concatenate(got) if got else np.zeros(0), d)


def test_multimodal_modes_are_read(tmp_path, mcore):
    docs = random_docs(50, 2048, seed=4)
    ds = IndexedDataset(write_megatron(mcore, tmp_path / "mm", docs, np.uint16, multimodal=True))
    assert ds.sequence_modes.tolist() == [k % 3 for k in range(len(docs))]
    for k, d in enumerate(docs):
        assert np.array_equal(ds[k], d)


def test_tokens_slices_and_views(tmp_path):
    docs = random_docs(20, 131_072, seed=5)
    ds = IndexedDataset(write_ours(tmp_path / "ds", docs, np.int32))
    d = docs[2]
    assert np.array_equal(ds.tokens(2, 10, 50), d[10:60])
    assert np.array_equal(ds.tokens(2, 0, len(d)), d)
    assert np.array_equal(ds[-1], docs[-1])
    assert not ds[2].flags.writeable and ds[2].base is not None  # a view of the memmap
    for bad in ((2, -1, 5), (2, len(d) - 4, 5), (2, 0, -1)):
        with pytest.raises(IndexError, match="outside document 2"):
            ds.tokens(*bad)
    with pytest.raises(IndexError, match="out of range"):
        ds[len(docs)]
    clone = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(clone[3], docs[3]) and len(clone) == len(ds)


def test_check_token_ids(tmp_path):
    docs = [np.array([1, 2, 3]), np.array([4, 2047]), np.array([2048, 0])]
    ds = IndexedDataset(write_ours(tmp_path / "ds", docs, np.int32))
    ds.check_token_ids(2049)
    with pytest.raises(DataFileError, match=r"ds\.bin: document 2 has token id 2048 .* 2048"):
        ds.check_token_ids(2048, chunk=2)


# ------------------------------------------------------------------- the writer


def test_writer_refuses_ids_that_do_not_fit(tmp_path):
    with pytest.raises(DataFileError, match=r"document 1: token id 65536 does not fit uint16"):
        with IndexedDatasetWriter(tmp_path / "ds", np.uint16) as w:
            w.add_document([1, 2])
            w.add_document([3, 65536])
    with pytest.raises(DataFileError, match=r"document 0: token id -1 does not fit uint16"):
        with IndexedDatasetWriter(tmp_path / "ds", np.uint16) as w:
            w.add_document(np.array([-1]))
    with pytest.raises(DataFileError, match="must be integers"):
        with IndexedDatasetWriter(tmp_path / "ds", np.int32) as w:
            w.add_document(np.array([1.5]))
    with pytest.raises(DataFileError, match="cannot hold token ids"):
        IndexedDatasetWriter(tmp_path / "ds", np.float32)
    assert os.listdir(tmp_path) == []  # nothing left behind, not even temporaries


def test_writer_leaves_nothing_on_error_or_empty(tmp_path):
    with pytest.raises(KeyError):
        with IndexedDatasetWriter(tmp_path / "ds", np.int32) as w:
            w.add_document([1, 2, 3])
            raise KeyError("boom")
    with pytest.raises(DataFileError, match="no documents"):
        with IndexedDatasetWriter(tmp_path / "ds", np.int32):
            pass
    assert os.listdir(tmp_path) == []


def test_writer_replaces_an_old_pair_whole(tmp_path):
    old = write_ours(tmp_path / "ds", [np.arange(10)], np.int32)
    w = IndexedDatasetWriter(old, np.int32)
    w.add_document(np.arange(5))
    assert IndexedDataset(old).num_tokens == 10  # the old pair until commit
    w.commit()
    ds = IndexedDataset(old)
    assert ds.num_tokens == 5 and sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]


# ------------------------------------------------------------------ bad files


def _corrupt(prefix, kind):
    idx, bin_ = f"{prefix}.idx", f"{prefix}.bin"

    def patch(path, offset, data):
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def cut(path, n):
        os.truncate(path, os.path.getsize(path) - n)

    {
        "missing_idx": lambda: os.remove(idx),
        "missing_bin": lambda: os.remove(bin_),
        "idx_shorter_than_header": lambda: os.truncate(idx, 20),
        "truncated_idx": lambda: cut(idx, 8),
        "trailing_idx": lambda: open(idx, "ab").write(b"\0" * 5),  # 3 would be modes
        "truncated_bin": lambda: cut(bin_, 4),
        "longer_bin": lambda: open(bin_, "ab").write(b"\0" * 4),
        "wrong_magic": lambda: patch(idx, 0, b"MMIDIDY"),
        "wrong_version": lambda: patch(idx, 9, struct.pack("<Q", 2)),
        "unknown_dtype_code": lambda: patch(idx, 17, bytes([9])),
        "float_dtype_code": lambda: patch(idx, 17, bytes([7])),
        "pointers_inconsistent": lambda: patch(idx, 34 + 4 * 3 + 8, struct.pack("<q", 12)),
        "doc_indices_inconsistent": lambda: patch(idx, 34 + 12 * 3 + 8, struct.pack("<q", 5)),
        "zero_document_count": lambda: patch(idx, 26, struct.pack("<Q", 0)),
    }[kind]()


BAD = {
    "missing_idx": r"ds\.idx: missing",
    "missing_bin": r"ds\.bin: missing",
    "idx_shorter_than_header": r"ds\.idx: truncated \(20 bytes",
    "truncated_idx": r"ds\.idx: truncated",
    "trailing_idx": r"ds\.idx: has trailing bytes",
    "truncated_bin": r"ds\.bin: 20 bytes, but .*ds\.idx indexes 6 tokens",
    "longer_bin": r"ds\.bin: 28 bytes, but .*ds\.idx indexes 6 tokens",
    "wrong_magic": r"ds\.idx: not a Megatron indexed-dataset index",
    "wrong_version": r"ds\.idx: version 2",
    "unknown_dtype_code": r"ds\.idx: unknown dtype code 9",
    "float_dtype_code": r"ds\.idx: dtype code 7: dtype float32 cannot hold token ids",
    "pointers_inconsistent": r"ds\.idx: sequence pointers inconsistent: sequence 1",
    "doc_indices_inconsistent": r"ds\.idx: document indices inconsistent",
    "zero_document_count": r"ds\.idx: (document count 0|truncated)",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_files_are_refused_naming_the_file(tmp_path, kind):
    prefix = write_ours(tmp_path / "ds", [np.array([1, 2]), np.array([3]), np.array([4, 5, 6])], np.int32)
    IndexedDataset(prefix)  # valid before
    _corrupt(prefix, kind)
    with pytest.raises(DataFileError, match=BAD[kind]) as err:
        IndexedDataset(prefix)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path) in msg


def test_empty_dataset_is_refused(tmp_path, mcore):
    b = mcore.IndexedDatasetBuilder(f"{tmp_path}/ds.bin", dtype=np.int32)
    b.finalize(f"{tmp_path}/ds.idx")  # megatron writes a zero-document pair
    with pytest.raises(DataFileError, match=r"ds\.idx: empty dataset \(zero documents\)"):
        IndexedDataset(tmp_path / "ds")


def test_crash_between_the_renames_leaves_no_valid_pair(tmp_path, monkeypatch):
    """The old pair has as many tokens as the new one (sizes would match): a crash
    after the new .bin is in place must not leave the old .idx to vouch for it."""
    import torchtitan_nemotron3.data.indexed as indexed

    prefix = write_ours(tmp_path / "ds", [np.arange(6)], np.int32)
    real = os.replace

    def crash_on_idx(src, dst):
        if str(dst).endswith(".idx"):
            raise OSError("simulated crash before the .idx rename")
        return real(src, dst)

    monkeypatch.setattr(indexed.os, "replace", crash_on_idx)
    with pytest.raises(OSError, match="simulated crash"):
        with IndexedDatasetWriter(prefix, np.int32) as w:
            w.add_document(np.arange(6) + 100)
    with pytest.raises(DataFileError, match=r"ds\.idx: missing"):
        IndexedDataset(prefix)
    assert sorted(os.listdir(tmp_path)) == ["ds.bin"]
