"""Megatron's indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``) in struct + numpy.

The ecosystem's pretraining interchange format: Megatron-LM's ``preprocess_data.py``,
NVIDIA's Nemotron data preparation and datatrove write it. Read here without
megatron-core (its import pulls in most of Megatron); the tests check both ways against
megatron-core's own builder and reader, and byte equality of what we write.

``.idx`` layout (little-endian)::

    0   9 bytes  magic b"MMIDIDX\\x00\\x00"
    9   uint64   version, 1
    17  uint8    dtype code of the tokens in .bin (DTYPE_CODES)
    18  uint64   S, number of sequences
    26  uint64   D, len(document_indices) = number of documents + 1
    34  int32[S] sequence lengths (tokens)
        int64[S] sequence pointers (byte offset of each sequence in .bin)
        int64[D] document indices: document k is sequences [di[k], di[k+1])
        int8[S]  sequence modes, multimodal files only (recognised by the file size)

``.bin`` is the tokens, concatenated, no header. A Megatron *document* may span several
sequences (``--split-sentences``); this reader serves documents, whose tokens are
contiguous because the pointers are checked to be the running sum of the lengths.
"""

from __future__ import annotations

import array
import hashlib
import os
import struct
import tempfile
from collections.abc import Sequence

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D: 34 bytes
# Megatron's ``DType`` enum. Float codes exist there but hold no token ids.
DTYPE_CODES = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF = {dtype: code for code, dtype in DTYPE_CODES.items()}


class DataFileError(ValueError):
    """A bad data file or input; the message is one line naming the file (and the
    document, row or byte offset where known)."""


def optimal_dtype(vocab_size: int) -> np.dtype:
    """Megatron's ``DType.optimal_dtype``: uint16 when the vocabulary has fewer than
    65,500 ids, else int32 (Nemotron-3's 131,072 ids: int32, 4 bytes a token)."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def _token_dtype(dtype, where: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in _CODE_OF or dtype.kind not in "iu":
        raise DataFileError(
            f"{where}: dtype {dtype} cannot hold token ids in an indexed dataset "
            f"(one of {', '.join(str(d) for d in DTYPE_CODES.values() if d.kind in 'iu')})"
        )
    return dtype


class IndexedDataset:
    """A read-only indexed dataset: the ``.idx`` read and checked whole, the ``.bin``
    memory-mapped. ``ds[k]`` is document ``k``'s tokens (a zero-copy view, file dtype).

    Every inconsistency is refused at open with a :class:`DataFileError` naming the
    file: so a pair torn by a crash (or an ``.idx`` beside another run's ``.bin``) is
    never read as valid. Pickles by prefix (re-opened in a spawned worker).
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        self.idx_path = self.prefix + ".idx"
        self.bin_path = self.prefix + ".bin"
        self._open()

    # ------------------------------------------------------------------ open
    def _open(self) -> None:
        idx, bin_ = self.idx_path, self.bin_path
        missing = [p for p in (idx, bin_) if not os.path.isfile(p)]
        if missing:
            raise DataFileError(
                f"{' and '.join(missing)}: missing (an indexed dataset is {idx} + {bin_})"
            )
        idx_size = os.path.getsize(idx)
        if idx_size < _HEADER.size:
            raise DataFileError(
                f"{idx}: truncated ({idx_size} bytes, shorter than the {_HEADER.size}-byte header)"
            )
        with open(idx, "rb") as f:
            magic, version, code, S, D = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise DataFileError(
                f"{idx}: not a Megatron indexed-dataset index (magic {magic!r} at byte 0, "
                f"expected {MAGIC!r})"
            )
        if version != VERSION:
            raise DataFileError(f"{idx}: version {version} at byte 9 (only version 1 exists)")
        if code not in DTYPE_CODES:
            raise DataFileError(
                f"{idx}: unknown dtype code {code} at byte 17 (known: 1-8, Megatron's DType)"
            )
        self.dtype_code = code
        self.dtype = _token_dtype(DTYPE_CODES[code], f"{idx}: dtype code {code}")
        if D < 1:
            raise DataFileError(
                f"{idx}: document count {D} at byte 26 (it is documents + 1, at least 1)"
            )
        base = _HEADER.size + 12 * S + 8 * D
        if idx_size == base:
            multimodal = False
        elif idx_size == base + S and S > 0:
            multimodal = True
        else:
            what = "truncated" if idx_size < base else "has trailing bytes"
            raise DataFileError(
                f"{idx}: {what} ({idx_size} bytes; {S} sequences and {D - 1} documents "
                f"need {base}, or {base + S} with multimodal modes)"
            )
        if D == 1:
            raise DataFileError(f"{idx}: empty dataset (zero documents)")

        raw = np.memmap(idx, dtype=np.uint8, mode="r") if idx_size else None
        off = _HEADER.size
        self.sequence_lengths = np.frombuffer(raw, np.int32, S, off)
        self.sequence_pointers = np.frombuffer(raw, np.int64, S, off + 4 * S)
        self.document_indices = np.frombuffer(raw, np.int64, D, off + 12 * S)
        self.sequence_modes = (
            np.frombuffer(raw, np.int8, S, off + 12 * S + 8 * D) if multimodal else None
        )

        lengths = self.sequence_lengths.astype(np.int64)
        if S and lengths.min() < 0:
            seq = int(np.argmax(lengths < 0))
            raise DataFileError(f"{idx}: sequence {seq} has negative length {lengths[seq]}")
        itemsize = self.dtype.itemsize
        starts = np.zeros(S + 1, dtype=np.int64)  # token offset of each sequence, then the end
        np.cumsum(lengths, out=starts[1:])
        bad = np.flatnonzero(self.sequence_pointers != starts[:S] * itemsize)
        if bad.size:
            seq = int(bad[0])
            raise DataFileError(
                f"{idx}: sequence pointers inconsistent: sequence {seq} points at byte "
                f"{int(self.sequence_pointers[seq])}, the lengths before it put it at "
                f"{int(starts[seq]) * itemsize}"
            )
        di = self.document_indices
        if di[0] != 0 or di[-1] != S or (D > 1 and np.any(np.diff(di) < 0)):
            raise DataFileError(
                f"{idx}: document indices inconsistent (must rise from 0 to the "
                f"sequence count {S}; got {int(di[0])}..{int(di[-1])})"
            )
        self.num_tokens = int(starts[S])
        bin_size = os.path.getsize(bin_)
        if bin_size != self.num_tokens * itemsize:
            raise DataFileError(
                f"{bin_}: {bin_size} bytes, but {idx} indexes {self.num_tokens} tokens of "
                f"{self.dtype} = {self.num_tokens * itemsize} bytes (a torn or mismatched pair)"
            )
        # doc_offsets[k]: token offset of document k in .bin; [num_docs] = num_tokens.
        self.doc_offsets = starts[di]
        self.doc_lengths = np.diff(self.doc_offsets)
        self._tokens = (
            np.memmap(bin_, dtype=self.dtype, mode="r").view(np.ndarray)
            if self.num_tokens
            else np.empty(0, dtype=self.dtype)
        )

    # ----------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.doc_lengths)

    def __getitem__(self, doc: int) -> np.ndarray:
        doc = self._doc(doc)
        return self._tokens[self.doc_offsets[doc] : self.doc_offsets[doc + 1]]

    def tokens(self, doc: int, offset: int, length: int) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of document ``doc`` (a view)."""
        doc = self._doc(doc)
        n = int(self.doc_lengths[doc])
        if offset < 0 or length < 0 or offset + length > n:
            raise IndexError(
                f"{self.prefix}: tokens [{offset}, {offset + length}) outside document "
                f"{doc} of {n} tokens"
            )
        start = int(self.doc_offsets[doc]) + offset
        return self._tokens[start : start + length]

    def _doc(self, doc: int) -> int:
        n = len(self)
        d = int(doc)
        if d < 0:
            d += n
        if not 0 <= d < n:
            raise IndexError(f"{self.prefix}: document {doc} out of range ({n} documents)")
        return d

    def check_token_ids(self, vocab_size: int, chunk: int = 1 << 24) -> None:
        """Refuse a token id outside ``[0, vocab_size)`` (a file made with another
        tokenizer), naming the first bad document. Reads the whole ``.bin``."""
        for start in range(0, self.num_tokens, chunk):
            part = self._tokens[start : start + chunk]
            bad = np.flatnonzero((part < 0) | (part >= vocab_size))
            if bad.size:
                pos = start + int(bad[0])
                doc = int(np.searchsorted(self.doc_offsets, pos, side="right")) - 1
                raise DataFileError(
                    f"{self.bin_path}: document {doc} has token id {int(self._tokens[pos])} "
                    f"(byte {pos * self.dtype.itemsize}), outside the vocabulary of {vocab_size}"
                )

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.prefix!r}, {len(self)} documents, "
            f"{self.num_tokens} tokens, {self.dtype})"
        )

    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.__init__(state["prefix"])


class IndexedDatasetWriter:
    """Writes ``<prefix>.bin`` + ``<prefix>.idx``, byte-identical to megatron-core's
    ``IndexedDatasetBuilder`` for the same documents and dtype (one sequence per
    document unless ``sequence_lengths`` splits it).

    Atomic: tokens and index go to hidden temporary files in the prefix's directory
    (``.<name>.*.tmp``), each fsynced; :meth:`commit` then removes any old
    ``<prefix>.idx``, renames the ``.bin`` into place, then the ``.idx``, and fsyncs the
    directory. The ``.idx`` is the commit record: at every instant of a crash the
    prefix holds the old complete pair, a ``.bin`` alone, or the new complete pair,
    never an ``.idx`` beside a ``.bin`` it was not written with (the reader would also
    refuse a size mismatch). On an exception, or if never committed, the temporary
    files are removed; a killed process can leave only hidden ``.tmp`` files.
    """

    def __init__(self, prefix: str | os.PathLike, dtype):
        self.prefix = os.path.abspath(os.fspath(prefix))
        self.dtype = _token_dtype(dtype, f"{self.prefix}.bin")
        info = np.iinfo(self.dtype)
        self._min, self._max = int(info.min), int(info.max)
        directory, name = os.path.split(self.prefix)
        os.makedirs(directory, exist_ok=True)
        fd, self._bin_tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".bin.tmp", dir=directory)
        self._bin = os.fdopen(fd, "wb", buffering=1 << 20)
        self._lengths = array.array("q")
        self._doc_indices = array.array("q", [0])
        self.num_tokens = 0
        self._sha = hashlib.sha256()  # of the .bin, as written (no second read)
        self._done = False

    @property
    def num_documents(self) -> int:
        return len(self._doc_indices) - 1

    def add_document(self, tokens, sequence_lengths: Sequence[int] | None = None) -> None:
        """Append one document (1-D integer ids). ``sequence_lengths`` splits it into
        Megatron sequences (sentence-split files); default: one sequence."""
        if self._done:
            raise RuntimeError(f"{self.prefix}: writer already committed or aborted")
        where = f"{self.prefix}.bin: document {self.num_documents}"
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise DataFileError(f"{where}: tokens must be 1-D, got shape {arr.shape}")
        if arr.size:
            if arr.dtype.kind not in "iu":
                raise DataFileError(f"{where}: token ids must be integers, got {arr.dtype}")
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._min or hi > self._max:
                bad = lo if lo < self._min else hi
                raise DataFileError(
                    f"{where}: token id {bad} does not fit {self.dtype} "
                    f"({self._min}..{self._max})"
                )
        lengths = [arr.size] if sequence_lengths is None else [int(n) for n in sequence_lengths]
        if sum(lengths) != arr.size or any(n < 0 or n >= 2**31 for n in lengths):
            raise DataFileError(
                f"{where}: sequence lengths {lengths} do not split {arr.size} tokens "
                "(each 0..2^31-1)"
            )
        data = arr.astype(self.dtype, copy=False).tobytes()
        self._bin.write(data)
        self._sha.update(data)
        self._lengths.extend(lengths)
        self._doc_indices.append(len(self._lengths))
        self.num_tokens += arr.size

    @property
    def bin_sha256(self) -> str:
        """SHA-256 of the ``.bin`` bytes written so far (hashed while writing: about
        1.7 GB/s, a rounding error next to tokenizing)."""
        return self._sha.hexdigest()

    def index_bytes(self) -> bytes:
        """The ``.idx`` contents for the documents added so far."""
        lengths = np.frombuffer(self._lengths, dtype=np.int64) if self._lengths else np.zeros(0, np.int64)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        header = _HEADER.pack(MAGIC, VERSION, _CODE_OF[self.dtype], len(lengths), len(self._doc_indices))
        return b"".join(
            (
                header,
                lengths.astype(np.int32).tobytes(),
                pointers.tobytes(),
                np.frombuffer(self._doc_indices, dtype=np.int64).tobytes(),
            )
        )

    def commit(self) -> None:
        if self._done:
            raise RuntimeError(f"{self.prefix}: writer already committed or aborted")
        if not self.num_documents:
            self.abort()
            raise DataFileError(f"{self.prefix}: no documents to write (an empty dataset)")
        idx_tmp = None
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            directory, name = os.path.split(self.prefix)
            fd, idx_tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".idx.tmp", dir=directory)
            with os.fdopen(fd, "wb") as f:
                f.write(self.index_bytes())
                f.flush()
                os.fsync(f.fileno())
            for tmp in (self._bin_tmp, idx_tmp):
                os.chmod(tmp, 0o644 & ~_umask())
            try:
                os.unlink(self.prefix + ".idx")  # never an old .idx beside the new .bin
            except FileNotFoundError:
                pass
            os.replace(self._bin_tmp, self.prefix + ".bin")
            os.replace(idx_tmp, self.prefix + ".idx")
            idx_tmp = None
            _fsync_dir(directory)
        finally:
            self._done = True
            for tmp in (self._bin_tmp, idx_tmp):
                if tmp is not None and os.path.exists(tmp):
                    os.unlink(tmp)

    def abort(self) -> None:
        """Drop everything written; nothing appears at the prefix."""
        if not self._bin.closed:
            self._bin.close()
        if os.path.exists(self._bin_tmp):
            os.unlink(self._bin_tmp)
        self._done = True

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self._done:
                self.commit()
        else:
            self.abort()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
