"""Tokenize a corpus offline into Megatron's indexed format (``scripts/prepare_data.py``).

Why offline: one 8-GPU node at the target speed consumes ~350K tokens/s, about what one
CPU core tokenizes with a 131K vocabulary; read from a memmap the same tokens cost
nothing on the training critical path (research/data_2026_12.md §6).

* inputs, in the order given: ``.jsonl``/``.json``/``.parquet``/``.txt`` files,
  directories (their files of those kinds, sorted), globs (sorted matches), or a hub
  dataset ``owner/name`` streamed through ``datasets``; a ``.txt`` file is one document;
* framing: each document is ``[BOS] + encode(text) + [EOS]`` (BOS only with
  ``add_bos``; Nemotron's pretraining data has none), EOS the tokenizer's
  ``eos_token`` (tokenizer_config.json) unless ``eos_token`` names another;
* token dtype from the vocabulary size (:func:`optimal_dtype`: int32 for 131K);
* ``workers`` processes (forked, one tokenizer thread each) encode chunks of
  documents with ``encode_batch``; chunks are written in input order, so the files
  are byte-identical for any number of workers;
* bad input stops the run with one line naming the file and row (``skip_bad_rows``
  counts, reports and records them instead); nothing is skipped silently;
* output ``<prefix>.bin``/``.idx`` via :class:`IndexedDatasetWriter` (atomic), then
  ``<prefix>.manifest.json`` (atomic) recording the tokenizer, framing, sources and
  counts; an old manifest is removed first, so none ever describes other files.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .indexed import DataFileError, IndexedDatasetWriter, optimal_dtype

EXTENSIONS = (".jsonl", ".json", ".parquet", ".txt")
MANIFEST_VERSION = 1
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def manifest_path(prefix: str | os.PathLike) -> str:
    return os.fspath(prefix) + ".manifest.json"


def read_manifest(prefix: str | os.PathLike) -> dict | None:
    """The manifest beside ``prefix`` (None if there is none: Megatron's files have
    none)."""
    path = manifest_path(prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFileError(f"{path}: not a JSON manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise DataFileError(f"{path}: not a JSON manifest (a {type(manifest).__name__}, not an object)")
    return manifest


def _sha256_file(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_manifest(prefix: str | os.PathLike, dataset, *, verify_bin: bool = False) -> dict | None:
    """Check an opened ``IndexedDataset`` against the manifest ``prepare`` wrote beside
    it (None: no manifest, as for Megatron's own files: nothing to check).

    Always (cheap: the ``.idx`` is ~12 bytes a document): both file sizes, the
    ``.idx`` SHA-256, documents, tokens and dtype. The ``.bin`` SHA-256 only with
    ``verify_bin``: it reads the whole ``.bin`` (about 1.7 GB/s a core here, ~10 min
    a TB), so a changed token value, which no structural check can see, is found
    only then. Raises ``DataFileError`` naming the file that differs (or the
    manifest and its key, for a manifest that cannot be read)."""
    manifest = read_manifest(prefix)
    if manifest is None:
        return None
    path = manifest_path(prefix)

    def need(obj: dict, key: str, kind: type, where: str):
        if key not in obj:
            raise DataFileError(f"{path}: no {where!r} field")
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DataFileError(
                f"{path}: {where!r} is {type(value).__name__}, not {kind.__name__}"
            )
        return value

    version = need(manifest, "manifest_version", int, "manifest_version")
    if version != MANIFEST_VERSION:
        raise DataFileError(f"{path}: manifest_version {version} (this reader knows {MANIFEST_VERSION})")
    files = need(manifest, "files", dict, "files")
    facts = {k: need(files, k, int, f"files.{k}") for k in ("bin_bytes", "idx_bytes")}
    idx_sha = need(files, "idx_sha256", str, "files.idx_sha256")
    bin_sha = None  # absent from older manifests
    if "bin_sha256" in files:
        bin_sha = need(files, "bin_sha256", str, "files.bin_sha256")
    want = {k: need(manifest, k, int, k) for k in ("documents", "tokens")}
    dtype = need(manifest, "dtype", str, "dtype")
    idx, bin_ = dataset.idx_path, dataset.bin_path
    for name, key in ((bin_, "bin_bytes"), (idx, "idx_bytes")):
        size = os.path.getsize(name)
        if size != facts[key]:
            raise DataFileError(f"{name}: {size} bytes, its manifest {path} recorded {facts[key]}")
    got = {"documents": len(dataset), "tokens": dataset.num_tokens}
    for key in ("documents", "tokens"):
        if got[key] != want[key]:
            raise DataFileError(f"{idx}: {got[key]} {key}, its manifest {path} recorded {want[key]}")
    if str(dataset.dtype) != dtype:
        raise DataFileError(f"{idx}: dtype {dataset.dtype}, its manifest {path} recorded {dtype}")
    _check_sha256(idx, idx_sha, path, "changed since it was written")
    if verify_bin:
        if bin_sha is None:
            raise DataFileError(f"{path}: no 'files.bin_sha256' (written before checksums); cannot verify {bin_}")
        _check_sha256(bin_, bin_sha, path, "token values changed since it was written")
    return manifest


def _check_sha256(file: str, recorded: str, manifest_path: str, meaning: str) -> None:
    """``DataFileError`` naming ``file`` when its SHA-256 is not what its manifest
    recorded; ``meaning``: what the mismatch says about the file."""
    sha = _sha256_file(file)
    if sha != recorded:
        raise DataFileError(
            f"{file}: SHA-256 {sha[:16]}..., its manifest {manifest_path} recorded "
            f"{recorded[:16]}... ({meaning})"
        )


# -------------------------------------------------------------------- tokenizer


@dataclass
class TokenizerInfo:
    """The tokenizer of ``directory`` (tokenizer.json + tokenizer_config.json)."""

    directory: str
    eos_token: str | None = None  # None: tokenizer_config.json's eos_token
    bos_token: str | None = None  # None: tokenizer_config.json's bos_token
    path: str = field(init=False)
    sha256: str = field(init=False)
    vocab_size: int = field(init=False)
    eos_id: int = field(init=False)
    bos_id: int | None = field(init=False)
    tokenizer: object = field(init=False, repr=False)  # tokenizers.Tokenizer

    def __post_init__(self):
        from tokenizers import Tokenizer

        self.directory = os.path.abspath(os.path.expanduser(self.directory))
        self.path = os.path.join(self.directory, "tokenizer.json")
        if not os.path.isfile(self.path):
            raise DataFileError(f"{self.path}: missing (--tokenizer names a folder with tokenizer.json)")
        with open(self.path, "rb") as f:
            self.sha256 = hashlib.sha256(f.read()).hexdigest()
        try:
            tok = self.tokenizer = Tokenizer.from_file(self.path)
        except Exception as e:  # noqa: BLE001 (the Rust side raises plain Exception)
            raise DataFileError(f"{self.path}: cannot load ({str(e).splitlines()[0]})") from None
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        config = {}
        config_path = os.path.join(self.directory, "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)

        def token(name: str, given: str | None) -> tuple[str | None, int | None]:
            text = given if given is not None else config.get(name)
            if isinstance(text, dict):  # {"content": ...} in older configs
                text = text.get("content")
            if text is None:
                return None, None
            tid = tok.token_to_id(text)
            if tid is None:
                raise DataFileError(f"{self.path}: {name} {text!r} is not in the vocabulary")
            return text, tid

        self.eos_token, eos_id = token("eos_token", self.eos_token)
        if eos_id is None:
            raise DataFileError(
                f"{config_path}: no eos_token (documents end with EOS; name one with --eos_token)"
            )
        self.eos_id = eos_id
        self.bos_token, self.bos_id = token("bos_token", self.bos_token)


# ----------------------------------------------------------------------- inputs


@dataclass
class Source:
    """One input: a local file, or a hub dataset."""

    kind: str  # "jsonl", "json", "parquet", "txt", "hub"
    name: str  # absolute path, or hub id
    config: str | None = None
    split: str = "train"
    documents: int = 0
    bad_rows: int = 0

    def describe(self) -> dict:
        if self.kind == "hub":
            d = {"hub": self.name, "config": self.config, "split": self.split}
        else:
            d = {"path": self.name, "bytes": os.path.getsize(self.name)}
        return d | {"format": self.kind, "documents": self.documents, "bad_rows": self.bad_rows}


def resolve_inputs(
    inputs: Sequence[str], *, hub_config: str | None = None, split: str = "train"
) -> list[Source]:
    """Files, directories, globs and hub ids → sources, in the order given."""
    if not inputs:
        raise DataFileError("no inputs given")
    sources: list[Source] = []

    def add_file(path: str, named: str) -> None:
        ext = os.path.splitext(path)[1].lower()
        if ext not in EXTENSIONS:
            raise DataFileError(
                f"{named}: unsupported file type {ext or '(none)'} (one of {', '.join(EXTENSIONS)})"
            )
        sources.append(Source(ext[1:], os.path.abspath(path)))

    for item in inputs:
        path = os.path.expanduser(item)
        if os.path.isfile(path):
            add_file(path, item)
        elif os.path.isdir(path):
            files = sorted(
                os.path.join(path, f)
                for f in os.listdir(path)
                if f.lower().endswith(EXTENSIONS) and os.path.isfile(os.path.join(path, f))
            )
            if not files:
                raise DataFileError(f"{item}: no {', '.join(EXTENSIONS)} files in this directory")
            for f in files:
                add_file(f, f)
        elif any(c in path for c in "*?["):
            files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
            if not files:
                raise DataFileError(f"{item}: no file matches this pattern")
            for f in files:
                add_file(f, f)
        elif _HUB_ID.match(item) and not item.lower().endswith(EXTENSIONS):
            sources.append(Source("hub", item, config=hub_config, split=split))
        else:
            raise DataFileError(f"{item}: no such file or directory (nor a hub id owner/name)")
    return sources


def _text(where: str, row, text_key: str) -> str:
    if not isinstance(row, dict):
        raise DataFileError(f"{where}: not a JSON object (got {type(row).__name__})")
    if text_key not in row:
        keys = ", ".join(list(row)[:8])
        raise DataFileError(f"{where}: no {text_key!r} field (fields: {keys})")
    text = row[text_key]
    if not isinstance(text, str):
        raise DataFileError(f"{where}: {text_key!r} is {type(text).__name__}, not a string")
    return text


def _utf8(where: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFileError(f"{where}: not valid UTF-8 (byte {e.start}: {e.reason})") from None


def iter_rows(source: Source, text_key: str) -> Iterator[tuple[str, str | DataFileError]]:
    """``(where, text)`` per row, or ``(where, DataFileError)`` for a bad row (the
    caller raises it, or counts it under ``skip_bad_rows``). Errors that make the
    whole source unreadable are raised here."""
    path = source.name
    if source.kind != "hub" and os.path.getsize(path) == 0:
        # a truncated write, not a document of one EOS (.txt) or no rows to skip
        raise DataFileError(f"{path}: empty file (0 bytes)")
    if source.kind == "txt":
        with open(path, "rb") as f:
            data = f.read()
        try:
            yield f"{path}", _utf8(path, data)
        except DataFileError as e:
            yield path, e
    elif source.kind in ("jsonl", "json"):
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
        if source.kind == "json" and head.startswith(b"["):
            with open(path, "rb") as f:
                text = _utf8(path, f.read())
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}: invalid JSON ({e})") from None
            for i, row in enumerate(rows, start=1):
                where = f"{path}: row {i}"
                try:
                    yield where, _text(where, row, text_key)
                except DataFileError as e:
                    yield where, e
            return
        with open(path, "rb") as f:  # JSON lines (also a .json holding JSON lines)
            row_no = 0
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                row_no += 1
                where = f"{path}: row {row_no} (line {line_no})"
                try:
                    row = json.loads(_utf8(where, line))
                except json.JSONDecodeError as e:
                    yield where, DataFileError(f"{where}: invalid JSON ({e})")
                    continue
                except DataFileError as e:
                    yield where, e
                    continue
                try:
                    yield where, _text(where, row, text_key)
                except DataFileError as e:
                    yield where, e
    elif source.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 (Arrow raises several kinds)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataFileError(f"{path}: cannot read as Parquet ({first})") from None
        names = pf.schema_arrow.names
        if text_key not in names:
            raise DataFileError(f"{path}: no {text_key!r} column (columns: {', '.join(names[:8])})")
        row_no = 0
        batches = pf.iter_batches(batch_size=4096, columns=[text_key])
        while True:
            try:
                batch = next(batches)
                values = batch.column(0).to_pylist()
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001 (a corrupt page: Arrow raises several kinds)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DataFileError(
                    f"{path}: cannot read as Parquet after row {row_no} ({first})"
                ) from None
            for value in values:
                row_no += 1
                where = f"{path}: row {row_no}"
                if isinstance(value, str):
                    yield where, value
                else:
                    kind = "null" if value is None else type(value).__name__
                    yield where, DataFileError(f"{where}: {text_key!r} is {kind}, not a string")
    elif source.kind == "hub":
        import datasets

        try:
            ds = datasets.load_dataset(path, source.config, split=source.split, streaming=True)
            rows = iter(ds)
        except Exception as e:  # noqa: BLE001 (network, missing, gated: many kinds)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataFileError(
                f"{path}: no such local path, and as a hub dataset (split "
                f"{source.split!r}) it cannot be loaded: "
                f"{type(e).__name__}: {first}"
            ) from None
        i = 0
        while True:
            i += 1
            where = f"{path}: row {i}"
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as e:  # noqa: BLE001 (a stream broken mid-way)
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise DataFileError(f"{where}: reading failed: {type(e).__name__}: {first}") from None
            try:
                yield where, _text(where, row, text_key)
            except DataFileError as e:
                yield where, e
    else:  # pragma: no cover
        raise AssertionError(source.kind)


# ------------------------------------------------------------------- tokenizing

_WORKER_TOKENIZER = None


def _worker_init(tokenizer_path: str) -> None:
    """A spawned worker loads the tokenizer; a forked one has the parent's."""
    global _WORKER_TOKENIZER
    from tokenizers import Tokenizer

    _WORKER_TOKENIZER = Tokenizer.from_file(tokenizer_path)


def _encode_chunk(args) -> tuple[np.ndarray, np.ndarray]:
    """Flat token ids (int32: half the bytes of int64 through the pipe) and
    per-document lengths of one chunk, framed."""
    texts, bos_id, eos_id = args
    encodings = _WORKER_TOKENIZER.encode_batch(texts, add_special_tokens=False)
    head = [bos_id] if bos_id is not None else []
    ids = [head + e.ids + [eos_id] for e in encodings]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


class _SingleThreaded:
    """One tokenizer thread in this process and in the workers (they inherit the
    environment): workers × threads never oversubscribe the cores, and
    ``encode_batch`` runs in order."""

    KEYS = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.KEYS}
        os.environ.update(self.KEYS)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class PrepareResult:
    prefix: str
    documents: int
    tokens: int
    seconds: float
    bad_rows: int
    manifest: dict

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def prepare(
    inputs: Sequence[str],
    tokenizer_dir: str | os.PathLike,
    output_prefix: str | os.PathLike,
    *,
    text_key: str = "text",
    add_bos: bool = False,
    eos_token: str | None = None,
    workers: int = 1,
    chunk_docs: int = 256,
    chunk_bytes: int = 1 << 20,
    hub_config: str | None = None,
    split: str = "train",
    skip_bad_rows: bool = False,
    progress: bool = True,
) -> PrepareResult:
    """Tokenize ``inputs`` into ``output_prefix``.bin/.idx/.manifest.json."""
    global _WORKER_TOKENIZER
    if workers < 1:
        raise DataFileError(f"workers = {workers}: must be at least 1")
    tok = TokenizerInfo(os.fspath(tokenizer_dir), eos_token=eos_token)
    if add_bos and tok.bos_id is None:
        raise DataFileError(f"{tok.directory}: add_bos asked, but the tokenizer names no bos_token")
    bos_id = tok.bos_id if add_bos else None
    sources = resolve_inputs(inputs, hub_config=hub_config, split=split)
    prefix = os.path.abspath(os.fspath(output_prefix))
    dtype = optimal_dtype(tok.vocab_size)
    bad: dict[str, list[str]] = collections.defaultdict(list)
    bad_count = 0

    def chunks() -> Iterator[tuple[list[Source], list[str]]]:
        nonlocal bad_count
        texts: list[str] = []
        owners: list[Source] = []
        size = 0
        for source in sources:
            for where, text in iter_rows(source, text_key):
                if isinstance(text, DataFileError):
                    if not skip_bad_rows:
                        raise text
                    bad_count += 1
                    source.bad_rows += 1
                    reason = str(text).removeprefix(where + ": ")
                    reason = re.sub(r"\(.*\)", "(...)", reason)
                    if len(bad[reason]) < 3:
                        bad[reason].append(where)
                    continue
                texts.append(text)
                owners.append(source)
                size += len(text)
                if len(texts) >= chunk_docs or size >= chunk_bytes:
                    yield owners, texts
                    texts, owners, size = [], [], 0
        if texts:
            yield owners, texts

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = (
        tqdm(unit=" docs", desc=os.path.basename(prefix), dynamic_ncols=True)
        if progress and tqdm
        else None
    )
    start = time.perf_counter()
    try:
        with _SingleThreaded(), IndexedDatasetWriter(prefix, dtype) as writer:

            def write(owners, encoded):
                flat, lengths = encoded
                ends = np.cumsum(lengths)
                for source, n, end in zip(owners, lengths, ends):
                    writer.add_document(flat[end - n : end])
                    source.documents += 1
                if bar is not None:
                    bar.update(len(owners))
                    bar.set_postfix(tokens=f"{writer.num_tokens:,}", refresh=False)

            _WORKER_TOKENIZER = tok.tokenizer  # this process, and forked workers (no reload)
            if workers == 1:
                for owners, texts in chunks():
                    write(owners, _encode_chunk((texts, bos_id, tok.eos_id)))
            else:
                import multiprocessing as mp

                # fork: the workers start at once (a spawned one would re-import the package,
                # torch included). Safe for the tokenizer: with TOKENIZERS_PARALLELISM=false
                # no Rayon thread pool is used in parent or child.
                method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
                ctx = mp.get_context(method)
                init = (_worker_init, (tok.path,)) if method == "spawn" else (None, ())
                with ctx.Pool(workers, *init) as pool:
                    pending: collections.deque = collections.deque()
                    for owners, texts in chunks():
                        pending.append((owners, pool.apply_async(_encode_chunk, ((texts, bos_id, tok.eos_id),))))
                        while len(pending) > 2 * workers:  # bounded: the corpus is not read ahead
                            o, r = pending.popleft()
                            write(o, r.get())
                    while pending:
                        o, r = pending.popleft()
                        write(o, r.get())
            if writer.num_documents == 0:
                named = ", ".join(inputs)
                extra = f" ({bad_count} bad rows skipped)" if bad_count else ""
                raise DataFileError(f"{named}: empty corpus, no documents{extra}")
            documents, tokens = writer.num_documents, writer.num_tokens
            bin_sha256 = writer.bin_sha256
            # The old manifest goes just before the new pair is committed: a crash in
            # between leaves a pair without a manifest, never one describing other files.
            try:
                os.unlink(manifest_path(prefix))
            except FileNotFoundError:
                pass
            writer.commit()
    finally:
        _WORKER_TOKENIZER = None
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start

    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "tool": f"torchtitan_nemotron3.data.prepare {_package_version()}",
        "created_unix": int(time.time()),
        "files": _file_facts(prefix) | {"bin_sha256": bin_sha256},
        "tokenizer": {
            "path": tok.path,
            "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "eos_token": tok.eos_token,
            "eos_id": tok.eos_id,
            "bos_token": tok.bos_token,
            "bos_id": tok.bos_id,
        },
        "framing": {"add_bos": bool(add_bos), "add_eos": True, "text_key": text_key},
        "dtype": str(np.dtype(dtype)),
        "documents": documents,
        "tokens": tokens,
        "bad_rows": {"count": bad_count, "examples": dict(bad)},
        "sources": [s.describe() for s in sources],
    }
    _write_json_atomic(manifest_path(prefix), manifest)
    return PrepareResult(prefix, documents, tokens, seconds, bad_count, manifest)


def _file_facts(prefix: str) -> dict:
    with open(prefix + ".idx", "rb") as f:
        idx_sha = hashlib.sha256(f.read()).hexdigest()
    return {
        "bin": os.path.basename(prefix + ".bin"),
        "bin_bytes": os.path.getsize(prefix + ".bin"),
        "idx": os.path.basename(prefix + ".idx"),
        "idx_bytes": os.path.getsize(prefix + ".idx"),
        "idx_sha256": idx_sha,
    }


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("torchtitan_nemotron3")
    except Exception:  # noqa: BLE001 (not installed: a source checkout)
        return "source"


def _write_json_atomic(path: str, obj: dict) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
