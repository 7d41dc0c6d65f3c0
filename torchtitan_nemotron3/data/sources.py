"""Document sources of a blend: a Megatron prefix (memmap, the fast path) or text
files tokenized at start-up with the job's tokenizer (small corpora).

A source is anything with ``__len__`` (documents), ``doc_lengths`` (int64 per
document) and ``__getitem__(doc)`` (its token ids), plus ``name`` (for messages)
and ``identity`` (what the resume fingerprint compares).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path

import numpy as np

TEXT_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
PREPARE_HINT = (
    "python scripts/prepare_data.py <your .jsonl/.parquet/.txt files> "
    "--tokenizer <the job's hf_assets_path> --output_prefix {prefix}"
)


class SourceError(ValueError):
    """A source that cannot be used; the message names the file (and document)."""


def is_text_spec(spec: str) -> bool:
    return (
        spec.endswith(TEXT_SUFFIXES)
        or os.path.isdir(spec)
        or any(c in spec for c in "*?[")
    )


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).view(np.uint8).data)
    return h.hexdigest()[:16]


class MegatronSource:
    """A Megatron ``.bin``/``.idx`` pair (``indexed.IndexedDataset``), checked
    against the manifest ``scripts/prepare_data.py`` wrote beside it, when there is
    one (sizes and the ``.idx`` SHA-256; the ``.bin`` SHA-256 with ``verify_bin``)."""

    def __init__(self, prefix: str, verify_bin: bool = False):
        prefix = prefix.removesuffix(".bin").removesuffix(".idx")
        if not (os.path.exists(prefix + ".bin") or os.path.exists(prefix + ".idx")):
            raise SourceError(
                f"{prefix}: no such Megatron dataset ({prefix}.bin/.idx not found); "
                "prepare it with: "
                + PREPARE_HINT.format(prefix=prefix)
            )
        from .indexed import IndexedDataset
        from .prepare import check_manifest

        self.dataset = IndexedDataset(prefix)
        check_manifest(prefix, self.dataset, verify_bin=verify_bin)
        self.name = prefix
        self.data_file = self.dataset.bin_path  # what a bad token id names
        self.doc_lengths = np.asarray(self.dataset.doc_lengths, dtype=np.int64)
        self.identity = (
            f"megatron:{os.path.basename(prefix)}:docs={len(self.doc_lengths)}:"
            f"tokens={int(self.doc_lengths.sum())}:lengths={_digest(self.doc_lengths)}"
        )

    def __len__(self) -> int:
        return len(self.doc_lengths)

    def __getitem__(self, doc: int) -> np.ndarray:
        return self.dataset[doc]


class TokenizedTextSource:
    """Text files read and tokenized when the loader is built: ``.jsonl``/``.json``
    (one document per record, ``text_key``), ``.parquet`` (a column), ``.txt``
    (one document per file); a directory or glob expands to those files, sorted.
    Documents are framed as NVIDIA's data (EOS last, no BOS), as
    ``scripts/prepare_data.py`` writes them."""

    def __init__(self, spec: str, tokenizer, text_key: str = "text"):
        self.name = spec
        files = _expand(spec)
        eos = getattr(tokenizer, "eos_id", None)
        if eos is None:
            raise SourceError(f"{spec}: the tokenizer has no EOS token to end documents with")
        docs: list[np.ndarray] = []
        for path in files:
            for where, text in _texts(path, text_key):
                ids = tokenizer.encode(text, add_bos=False, add_eos=False)
                docs.append(np.asarray([*ids, eos], dtype=np.int64))
        if not docs:
            raise SourceError(f"{spec}: no documents in {len(files)} file(s)")
        self.doc_lengths = np.array([len(d) for d in docs], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self.doc_lengths)])
        self._tokens = np.concatenate(docs)
        self.identity = (
            f"text:{os.path.basename(spec.rstrip('/'))}:docs={len(docs)}:tokens={len(self._tokens)}:"
            f"ids={_digest(self._tokens)}"
        )

    def __len__(self) -> int:
        return len(self.doc_lengths)

    def __getitem__(self, doc: int) -> np.ndarray:
        return self._tokens[self._offsets[doc] : self._offsets[doc + 1]]


def _expand(spec: str) -> list[str]:
    if os.path.isdir(spec):
        files = sorted(
            str(p) for p in Path(spec).rglob("*") if str(p).endswith(TEXT_SUFFIXES)
        )
    elif any(c in spec for c in "*?["):
        files = sorted(glob.glob(spec, recursive=True))
    else:
        files = [spec] if os.path.exists(spec) else []
    if not files:
        raise SourceError(f"{spec}: no such file, or no {'/'.join(TEXT_SUFFIXES)} files")
    return files


def _texts(path: str, key: str):
    """(where, text) of each document of one file; a missing or non-string text
    field is an error naming the file and line, never skipped."""
    if os.path.getsize(path) == 0:  # a .txt would be a document of one EOS
        raise SourceError(f"{path}: empty file (0 bytes)")
    if path.endswith(".txt"):
        try:
            with open(path, encoding="utf-8") as f:
                yield path, f.read()
        except UnicodeDecodeError as e:
            raise SourceError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        return
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 (Arrow raises several kinds)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SourceError(f"{path}: cannot read as Parquet ({first})") from None
        if key not in table.column_names:
            raise SourceError(f"{path}: no column {key!r} (columns: {table.column_names})")
        for i, text in enumerate(table.column(key).to_pylist()):
            yield _checked(f"{path}: row {i}", text, key)
        return
    with open(path, "rb") as f:
        raw = f.read()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.endswith(".json") and content.lstrip().startswith("["):
        try:
            records = json.loads(content)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
        for i, rec in enumerate(records):
            yield _checked(f"{path}: record {i}", _field(rec, key, f"{path}: record {i}"), key)
        return
    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        yield _checked(f"{path}:{n}", _field(rec, key, f"{path}:{n}"), key)


def _field(rec, key: str, where: str):
    if not isinstance(rec, dict) or key not in rec:
        raise SourceError(f"{where}: no {key!r} field (set dataloader.text_key)")
    return rec[key]


def _checked(where: str, text, key: str) -> tuple[str, str]:
    if not isinstance(text, str):
        raise SourceError(f"{where}: field {key!r} is {type(text).__name__}, not text")
    return where, text


class HeldOut:
    """The documents of ``source`` in (``split="valid"``) or out of (``"train"``) a
    held-out fraction: a seeded choice of ``round(fraction·N)`` documents, the same
    for training and validation, so the two are disjoint."""

    def __init__(self, source, fraction: float, split: str, seed: int):
        n = len(source)
        k = int(round(fraction * n))
        if fraction > 0 and k == 0:
            raise SourceError(
                f"{source.name}: valid_fraction={fraction} holds out no document "
                f"of {n}"
            )
        chosen = np.zeros(n, dtype=bool)
        chosen[np.random.default_rng([seed, 0x5EED]).permutation(n)[:k]] = True
        self.docs = np.flatnonzero(chosen if split == "valid" else ~chosen)
        self.source, self.name = source, source.name
        self.data_file = getattr(source, "data_file", None)
        self.doc_lengths = source.doc_lengths[self.docs]
        self.identity = f"{source.identity}:{split}={fraction}"

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, doc: int) -> np.ndarray:
        return self.source[int(self.docs[doc])]

    def document_id(self, doc: int) -> int:
        return int(self.docs[doc])


def open_source(spec: str, tokenizer=None, text_key: str = "text", verify_bin: bool = False):
    if is_text_spec(spec):
        if tokenizer is None:
            raise SourceError(f"{spec}: text files need the job's tokenizer")
        return TokenizedTextSource(spec, tokenizer, text_key)
    return MegatronSource(spec, verify_bin=verify_bin)


def check_blend_files(blend: str, key: str = "dataloader.blend") -> None:
    """Every source of ``blend`` exists (a prefix's .bin and .idx, text files):
    the config-time check, one line naming the missing one."""
    from .blend import parse_blend

    for entry in parse_blend(blend, key=key):
        spec = entry.spec
        if is_text_spec(spec):
            _expand(spec)
            continue
        prefix = spec.removesuffix(".bin").removesuffix(".idx")
        missing = [s for s in (".bin", ".idx") if not os.path.isfile(prefix + s)]
        if missing:
            raise SourceError(
                f"{key}: {prefix}{'/'.join(missing)} not found; prepare it with: "
                + PREPARE_HINT.format(prefix=prefix)
            )
