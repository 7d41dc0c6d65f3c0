"""Every corrupt input named: seeded corruptions (truncation at random offsets,
flipped header bytes, garbage, empty files, wrong JSON types) of the files a run
reads: HF safetensors shards, ``config.json``, the shard index (through
``from_pretrained``), and a DCP step's ``.metadata``, ``.distcp`` and manifest
(through the commit-safe checkpoint manager with ``on_corrupt = "stop"``); and the
data files: Megatron ``.bin``/``.idx`` pairs with and without their prepare
manifest (through the pretraining loader's source and rows), the manifest itself,
text inputs of a blend and of ``prepare_data.py``, SFT and DPO rows
(JSONL/JSON/Parquet), the DPO precomputed reference table, adapters-only (LoRA /
QLoRA) DCP checkpoints on the export path, and the checkpoint ``timeline.json``.
Each must fail with one line naming the file: never a bare ``OverflowError`` /
``EOFError`` / deep traceback, never a silent load.

What no reader can see is allowed to load, and counted, only where stated: a
token value changed inside a ``.bin`` (found by ``dataloader.verify_checksums``
through the manifest's SHA-256, which reads the whole file), a JSONL file cut
exactly between two rows (a valid shorter file), and a Parquet footer flip in
metadata the reader does not use (every row must read back unchanged)."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
pytest.importorskip("transformers")

from hf_checkpoints import save_transformers_checkpoint, tiny_args  # noqa: E402

from torchtitan_nemotron3 import from_pretrained, save_pretrained  # noqa: E402
from torchtitan_nemotron3.hf import CheckpointMismatchError, CorruptCheckpointError  # noqa: E402
from torchtitan_nemotron3.resilience.manifest import CheckpointCorruptError  # noqa: E402

NAMED = (CorruptCheckpointError, CheckpointMismatchError, CheckpointCorruptError)
COUNTS: Counter = Counter()


def _truncate(path: Path, rng: random.Random) -> str:
    size = path.stat().st_size
    cut = rng.randrange(0, size)
    os.truncate(path, cut)
    return f"truncate@{cut}"


def _flip(path: Path, rng: random.Random, limit: int) -> str:
    data = bytearray(path.read_bytes())
    at = rng.randrange(0, min(limit, len(data)))
    data[at] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"flip@{at}"


def _garbage(path: Path, rng: random.Random) -> str:
    n = rng.choice([1, 7, 8, 64, 1000, 40000])
    path.write_bytes(bytes(rng.randrange(256) for _ in range(n)))
    return f"garbage{n}"


def _empty(path: Path, rng: random.Random) -> str:
    path.write_bytes(b"")
    return "empty"


def _used(key: str) -> bool:
    """A config.json key the loader reads (others are ignored by design)."""
    from torchtitan_nemotron3.hf import config as hf_config

    name = hf_config._ALIASES.get(key, key)
    return (
        name in hf_config._FIELDS and name not in hf_config._NOT_HF
    ) or name in hf_config._PATTERN_LISTS or key == "model_type"


def _wrong_type(path: Path, rng: random.Random) -> str:
    obj = json.loads(path.read_text())
    if path.name == "config.json":
        keys = sorted(k for k in obj if _used(k))
    else:  # the index: its weight_map is what is read
        keys = ["weight_map"]
    key = rng.choice(keys)
    old = obj[key]
    # A value of another JSON type than the stored one (null, "unset", is valid).
    wrong = [[1, 2], {"a": 1}]
    if not isinstance(old, str):
        wrong.append("x")
    if not isinstance(old, bool):
        wrong.append(True)
    if isinstance(old, (bool, str, list, dict)):
        wrong.append(3)
    obj[key] = rng.choice(wrong)
    path.write_text(json.dumps(obj))
    return f"{key}={obj[key]!r}"


def _header_size(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    single = save_transformers_checkpoint(tmp_path_factory.mktemp("one") / "hf", tiny_args(0))
    sharded = tmp_path_factory.mktemp("sharded") / "hf"
    save_pretrained(from_pretrained(single), sharded, max_shard_size="40KB")
    return Path(single), sharded


def _expect_named(load, path: Path, file: Path, how: str) -> None:
    try:
        load(path)
    except NAMED as e:
        message = str(e)
        assert file.name in message, f"{file.name} {how}: not named in: {message}"
        assert "\n" not in message, f"{file.name} {how}: several lines: {message}"
        COUNTS[file.name.split("-")[0]] += 1
        return
    except Exception as e:  # noqa: BLE001 (the point: nothing else may escape)
        pytest.fail(f"{file.name} {how}: {type(e).__name__}: {e}")
    pytest.fail(f"{file.name} {how}: loaded silently")


def _cases(rng, kinds, n):
    return [(kinds[i % len(kinds)], rng.random()) for i in range(n)]


def test_fuzz_hf_checkpoint_files(hf_dirs, tmp_path):
    single, sharded = hf_dirs
    rng = random.Random(0)
    n = 0
    plans = [
        (single, "model.safetensors", ["truncate", "flip_header", "garbage", "empty"], 48),
        (single, "config.json", ["truncate", "garbage", "empty", "wrong_type"], 40),
        (sharded, "model.safetensors.index.json", ["truncate", "garbage", "empty", "wrong_type"], 24),
        (sharded, None, ["truncate", "flip_header"], 16),  # a shard
    ]
    for src, name, kinds, count in plans:
        for kind, _ in _cases(rng, kinds, count):
            dst = tmp_path / f"c{n}"
            shutil.copytree(src, dst)
            if name is None:
                name_now = rng.choice(sorted(p.name for p in dst.glob("model-*.safetensors")))
            else:
                name_now = name
            file = dst / name_now
            if kind == "truncate":
                how = _truncate(file, rng)
            elif kind == "flip_header":
                how = _flip(file, rng, _header_size(file))
            elif kind == "garbage":
                how = _garbage(file, rng)
            elif kind == "empty":
                how = _empty(file, rng)
            else:
                how = _wrong_type(file, rng)
            _expect_named(from_pretrained, dst, file, how)
            shutil.rmtree(dst)
            n += 1
    print(f"HF corruptions refused naming the file: {n} ({dict(COUNTS)})")
    assert n == 128


@pytest.fixture(scope="module")
def dcp_step(tmp_path_factory):
    """A committed one-rank step (with its manifest) from the checkpoint manager."""
    import torch
    import torch.distributed as dist
    import torch.nn as nn

    from tests.faults.test_checkpoint_commit import _manager, _save

    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    base = tmp_path_factory.mktemp("dcp")
    mgr, model, ts = _manager(base, keep_latest_k=0, on_corrupt="stop")
    _save(mgr, model, ts, 1)
    mgr.close()
    del nn, torch
    yield base
    dist.destroy_process_group()


def test_fuzz_dcp_step_files(dcp_step, tmp_path):
    from tests.faults.test_checkpoint_commit import _manager

    rng = random.Random(1)
    n = 0
    plans = [
        (".metadata", ["truncate", "flip", "garbage", "empty"], 28),
        ("__0_0.distcp", ["truncate", "flip", "garbage", "empty"], 28),
        ("manifest.json", ["truncate", "garbage", "empty", "wrong_type"], 20),
    ]

    def load(base):
        mgr, _, _ = _manager(base, keep_latest_k=0, on_corrupt="stop")
        try:
            mgr.load()
        finally:
            mgr.close()

    for name, kinds, count in plans:
        for kind, _ in _cases(rng, kinds, count):
            base = tmp_path / f"c{n}"
            shutil.copytree(dcp_step, base)
            file = base / "checkpoint" / "step-1" / name
            if kind == "truncate":
                how = _truncate(file, rng)
            elif kind == "flip":
                how = _flip(file, rng, file.stat().st_size)
            elif kind == "garbage":
                how = _garbage(file, rng)
            elif kind == "empty":
                how = _empty(file, rng)
            else:
                obj = json.loads(file.read_text())
                obj["files"] = rng.choice(["x", [1], {".metadata": "x"}, 3])
                file.write_text(json.dumps(obj))
                how = f"files={obj['files']!r}"
            _expect_named(load, base, file, how)
            shutil.rmtree(base)
            n += 1
    print(f"DCP corruptions refused naming the file: {n}")
    assert n == 76


def test_a_manifest_that_lists_less_is_refused(dcp_step, tmp_path):
    """``manifest.json`` with ``files`` emptied, or without ``.metadata`` or a
    ``.distcp`` entry, would check less and load unchecked: refused naming it."""
    from tests.faults.test_checkpoint_commit import _manager

    for i, drop in enumerate([None, ".metadata", "__0_0.distcp"]):
        base = tmp_path / f"l{i}"
        shutil.copytree(dcp_step, base)
        file = base / "checkpoint" / "step-1" / "manifest.json"
        obj = json.loads(file.read_text())
        obj["files"] = {} if drop is None else {k: v for k, v in obj["files"].items() if k != drop}
        file.write_text(json.dumps(obj))

        def load():
            mgr, _, _ = _manager(base, keep_latest_k=0, on_corrupt="stop")
            try:
                mgr.load()
            finally:
                mgr.close()

        assert _refused(load, file, f"without {drop or 'any file'}", NAMED), f"{drop}: loaded unchecked"


def test_fuzz_tokenizer_files(tmp_path):
    """tokenizer.json and tokenizer_config.json of the debug assets: each
    corruption refused by the job check naming the file."""
    from torchtitan_nemotron3.hf.files import check_tokenizer_files
    from torchtitan_nemotron3.train.assets import ensure_debug_assets

    tokenizer_dir = Path(ensure_debug_assets()[0])
    rng = random.Random(2)
    n = 0
    for name, kinds in [
        ("tokenizer.json", ["truncate", "garbage", "empty", "wrong_type"]),
        ("tokenizer_config.json", ["truncate", "garbage", "empty"]),
    ]:
        for kind, _ in _cases(rng, kinds, 12):
            dst = tmp_path / f"t{n}"
            shutil.copytree(tokenizer_dir, dst)
            file = dst / name
            if kind == "truncate":
                size = file.stat().st_size
                os.truncate(file, rng.randrange(0, size - 2))  # never a whole JSON
                how = "truncate"
            elif kind == "garbage":
                how = _garbage(file, rng)
            elif kind == "empty":
                how = _empty(file, rng)
            else:
                obj = json.loads(file.read_text())
                obj["model"] = rng.choice(["x", [1], 3])
                file.write_text(json.dumps(obj))
                how = f"model={obj['model']!r}"
            _expect_named(check_tokenizer_files, dst, file, how)
            shutil.rmtree(dst)
            n += 1
    print(f"tokenizer corruptions refused naming the file: {n}")
    assert n == 24


# --------------------------------------------------------------------------------
# The data files: Megatron .bin/.idx pairs and their prepare manifest, text sources
# (pretraining and prepare_data.py), SFT/DPO rows, the DPO reference table, the
# adapters-only (LoRA/QLoRA) export path, the checkpoint timeline.

DATA_COUNTS: Counter = Counter()  # file kind -> corruptions refused naming the file
SILENT: Counter = Counter()  # file kind -> corruptions no reader can see (reported)


def _corrupt(file: Path, kind: str, rng: random.Random, *, header: int = 0) -> str:
    if kind == "truncate":
        return _truncate(file, rng)
    if kind == "truncate_json":  # never a cut that only drops trailing whitespace
        text = file.read_bytes()
        cut = rng.randrange(0, len(text.rstrip()))
        file.write_bytes(text[:cut])
        return f"truncate@{cut}"
    if kind == "flip":
        return _flip(file, rng, file.stat().st_size)
    if kind == "flip_high":  # bit 7 of an ASCII byte: never valid UTF-8
        data = bytearray(file.read_bytes())
        at = rng.choice([i for i, b in enumerate(data) if b < 0x80 and chr(b).isalnum()])
        data[at] ^= 0x80
        file.write_bytes(bytes(data))
        return f"flip_high@{at}"
    if kind == "flip_header":
        return _flip(file, rng, header)
    if kind == "garbage":
        return _garbage(file, rng)
    if kind == "empty":
        return _empty(file, rng)
    raise AssertionError(kind)


def _refused(load, file: Path, how: str, errors) -> bool:
    """True: refused with one line naming ``file``; False: it loaded."""
    try:
        load()
    except errors as e:
        message = str(e)
        assert file.name in message, f"{file.name} {how}: not named in: {message}"
        assert "\n" not in message, f"{file.name} {how}: several lines: {message}"
        return True
    except Exception as e:  # noqa: BLE001 (the point: nothing else may escape)
        pytest.fail(f"{file.name} {how}: {type(e).__name__}: {e}")
    return False


def _wrong_json_type(old):
    """A JSON value of another type than ``old`` (bool is not an int here)."""
    wrong = [[1, 2], {"a": 1}, None]
    if not isinstance(old, str):
        wrong.append("x")
    if not isinstance(old, bool):
        wrong.append(True)
    if isinstance(old, (bool, str, list, dict)) or old is None:
        wrong.append(3)
    if isinstance(old, (int, float)) and not isinstance(old, bool):
        wrong.append(1.5)
    return wrong


def _set_path(obj: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        obj = obj[p]
    obj[leaf] = value


def _get_path(obj: dict, key: str):
    for p in key.split("."):
        obj = obj[p]
    return obj


@pytest.fixture(scope="module")
def megatron_pair(tmp_path_factory):
    """``ds.bin``/``ds.idx``/``ds.manifest.json`` from prepare_data.py's function on
    the debug tokenizer (vocabulary 2048: uint16 tokens)."""
    from torchtitan_nemotron3.data.prepare import prepare
    from torchtitan_nemotron3.train.assets import ensure_debug_assets, generate_corpus

    tok_dir = ensure_debug_assets()[0]
    base = tmp_path_factory.mktemp("megatron")
    corpus = base / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in generate_corpus(40, seed=3)))
    prepare([str(corpus)], tok_dir, base / "pair" / "ds", progress=False)
    return base / "pair", tok_dir


# manifest keys the loader reads (the others describe the run, for people)
MANIFEST_KEYS = [
    "manifest_version", "files", "files.bin_bytes", "files.idx_bytes",
    "files.idx_sha256", "files.bin_sha256", "documents", "tokens", "dtype",
]


def _read_pair(prefix: Path, verify_bin: bool = False) -> None:
    """What the pretraining loader does with a prefix: open (and check against its
    manifest), then build every row of an epoch with the vocabulary check."""
    from torchtitan_nemotron3.data.rows import SourceRows
    from torchtitan_nemotron3.data.sources import MegatronSource

    rows = SourceRows(MegatronSource(str(prefix), verify_bin=verify_bin), seq_len=16,
                      seed=0, vocab_size=2048)
    for q in range(rows.rows_per_epoch):
        rows.row(q)


def _megatron_plans(k: int):
    """k = 1 by default (258 cases, ~0.4 s); --matrix: k = 8."""
    return [
        # (file, kinds, cases, with the manifest)
        ("ds.idx", ["truncate", "flip_header", "flip", "garbage", "empty"], 60 * k, True),
        ("ds.idx", ["truncate", "flip_header", "flip", "garbage", "empty"], 60 * k, False),
        ("ds.bin", ["truncate", "flip", "garbage", "empty"], 48 * k, True),
        ("ds.bin", ["truncate", "garbage", "empty"], 18 * k, False),
        ("ds.manifest.json", ["truncate_json", "garbage", "empty", "wrong_type"], 72 * k, True),
    ]


def _fuzz_megatron(megatron_pair, tmp_path, k: int):
    from torchtitan_nemotron3.data.indexed import DataFileError
    from torchtitan_nemotron3.data.rows import TokenIdError
    from torchtitan_nemotron3.data.sources import SourceError

    errors = (DataFileError, SourceError, TokenIdError)
    src, _ = megatron_pair
    rng = random.Random(3)
    n = 0
    counts, silent = Counter(), Counter()
    for name, kinds, count, with_manifest in _megatron_plans(k):
        label = name if with_manifest or name.endswith(".json") else f"{name} (no manifest)"
        for kind, _ in _cases(rng, kinds, count):
            dst = tmp_path / f"m{n}"
            shutil.copytree(src, dst)
            if not with_manifest:
                (dst / "ds.manifest.json").unlink()
            file = dst / name
            if kind == "wrong_type":
                obj = json.loads(file.read_text())
                key = rng.choice(MANIFEST_KEYS)
                _set_path(obj, key, rng.choice(_wrong_json_type(_get_path(obj, key))))
                file.write_text(json.dumps(obj))
                how = f"{key}={_get_path(obj, key)!r}"
            else:
                how = _corrupt(file, kind, rng, header=34)
            prefix = dst / "ds"
            if _refused(lambda: _read_pair(prefix), file, how, errors):
                counts[label] += 1
            else:
                # Only a token value changed inside the .bin (a flip keeping the id
                # in the vocabulary) or a flip in the .idx of a pair without manifest
                # that its structure cannot reveal: found only by a checksum.
                assert kind == "flip" and name != "ds.manifest.json", f"{name} {how}: loaded silently"
                if with_manifest:
                    assert name == "ds.bin", f"{name} {how}: loaded silently beside its manifest"
                    assert _refused(lambda: _read_pair(prefix, verify_bin=True), file, how, errors), (
                        f"{name} {how}: loaded silently with verify_checksums"
                    )
                    counts[label + " (verify_checksums)"] += 1
                silent[label] += 1
            shutil.rmtree(dst)
            n += 1
    DATA_COUNTS.update(counts)
    SILENT.update(silent)
    print(f"Megatron pair: {n} corruptions; refused naming the file: {dict(counts)}; "
          f"loaded without verify_checksums (token values / no manifest): {dict(silent)}")
    return n, counts, silent


def test_fuzz_megatron_pair(megatron_pair, tmp_path):
    n, _, silent = _fuzz_megatron(megatron_pair, tmp_path, 1)
    assert n == 258
    # with its manifest, nothing loads silently but .bin token values without verify
    assert set(silent) <= {"ds.bin", "ds.idx (no manifest)"}


def test_idx_change_its_structure_cannot_show_is_found_by_the_manifest(megatron_pair, tmp_path):
    """Document index 2 raised to 3 (one bit): still rising from 0 to S, so the
    structural checks pass (document 1 takes two sequences, document 2 none); only
    the manifest's .idx SHA-256 tells."""
    import struct

    from torchtitan_nemotron3.data.indexed import DataFileError, IndexedDataset

    src, _ = megatron_pair
    shutil.copytree(src, tmp_path / "p")
    prefix = tmp_path / "p" / "ds"
    ds = IndexedDataset(prefix)
    S = len(ds.sequence_lengths)
    assert ds.document_indices[2] == 2 and ds.document_indices[3] == 3
    with open(f"{prefix}.idx", "r+b") as f:
        f.seek(34 + 12 * S + 8 * 2)
        f.write(struct.pack("<q", 3))
    with pytest.raises(DataFileError, match=r"ds\.idx: SHA-256 .* its manifest .*ds\.manifest\.json recorded"):
        _read_pair(prefix)
    (tmp_path / "p" / "ds.manifest.json").unlink()
    assert list(IndexedDataset(prefix).doc_lengths[1:3]) != list(ds.doc_lengths[1:3])  # loads: the limit


def test_verify_checksums_finds_a_changed_token_value(megatron_pair, tmp_path):
    """A token id changed by one (bit 0 of a uint16: still in the vocabulary) is
    invisible to every structural check; ``dataloader.verify_checksums`` finds it
    through the manifest's .bin SHA-256, before the first batch."""
    from torchtitan_nemotron3.data.indexed import DataFileError
    from torchtitan_nemotron3.data.pretrain import PretrainDataLoader

    src, _ = megatron_pair
    shutil.copytree(src, tmp_path / "p")
    prefix = tmp_path / "p" / "ds"
    data = bytearray(Path(f"{prefix}.bin").read_bytes())
    data[10] ^= 1
    Path(f"{prefix}.bin").write_bytes(bytes(data))

    def loader(verify):
        cfg = PretrainDataLoader.Config(blend=str(prefix), vocab_size=2048, verify_checksums=verify)
        return PretrainDataLoader(cfg, dp_world_size=1, dp_rank=0, tokenizer=None,
                                  seq_len=16, local_batch_size=2)

    next(iter(loader(False)))  # the limit: without the full check it loads
    with pytest.raises(DataFileError, match=r"ds\.bin: SHA-256 .*ds\.manifest\.json recorded"):
        loader(True)


@pytest.mark.matrix
def test_fuzz_megatron_pair_matrix(megatron_pair, tmp_path):
    n, _, silent = _fuzz_megatron(megatron_pair, tmp_path, 8)
    assert n == 8 * 258
    assert set(silent) <= {"ds.bin", "ds.idx (no manifest)"}


# ------------------------------------------------------------ text and chat inputs

WRONG_ROW_VALUES = [3, True, {"a": 1}, [1, 2]]  # invalid for every field below


def _write_rows(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text(rows[0]["text"])


def _row_fields(row: dict) -> list[tuple]:
    """The paths of the fields a reader checks in one row."""
    paths = []
    for key, value in row.items():
        paths.append((key,))
        if isinstance(value, list):
            for i, m in enumerate(value):
                paths += [(key, i, k) for k in ("role", "content") if k in m]
    return paths


def _wrong_row_type(file: Path, rows: list[dict], rng: random.Random) -> str:
    rows = json.loads(json.dumps(rows))
    r = rng.randrange(len(rows))
    path = rng.choice(_row_fields(rows[r]))
    holder = rows[r]
    for p in path[:-1]:
        holder = holder[p]
    holder[path[-1]] = rng.choice(WRONG_ROW_VALUES)
    _write_rows(file, rows)
    return f"row {r + 1} {'.'.join(map(str, path))}={holder[path[-1]]!r}"


def _at_row_boundary(original: bytes, file: Path) -> bool:
    """A JSONL file cut between two rows: a valid shorter file (only a recorded
    size could tell)."""
    kept = file.read_bytes()
    return file.suffix == ".jsonl" and (
        kept.endswith(b"\n") or original[len(kept) : len(kept) + 1] == b"\n"
    )


TEXT_PLANS = [  # (file, kinds, cases)
    ("c.jsonl", ["truncate_json", "garbage", "empty", "wrong_type", "flip_high"], 20),
    ("c.json", ["truncate_json", "garbage", "empty", "wrong_type", "flip_high"], 15),
    ("c.parquet", ["truncate", "flip_footer", "garbage", "empty"], 12),
]


def _fuzz_rows(tmp_path, rows, plans, load, errors, seed, label):
    rng = random.Random(seed)
    counts, silent = Counter(), Counter()
    n = 0
    for name, kinds, count in plans:
        for kind, _ in _cases(rng, kinds, count):
            dst = tmp_path / f"{label}{n}"
            dst.mkdir()
            file = dst / name
            _write_rows(file, rows)
            original = file.read_bytes()
            if kind == "wrong_type":
                how = _wrong_row_type(file, rows, rng)
            elif kind == "flip_footer":  # Parquet's metadata: the file's last bytes
                footer = 8 + int.from_bytes(original[-8:-4], "little")
                data = bytearray(original)
                at = len(data) - 1 - rng.randrange(footer)
                data[at] ^= 1 << rng.randrange(8)
                file.write_bytes(bytes(data))
                how = f"flip@{at}"
            else:
                how = _corrupt(file, kind, rng)
            kind_label = f"{label} {Path(name).suffix[1:]}"
            got = []
            if _refused(lambda: got.append(load(file, dst)), file, how, errors):
                counts[kind_label] += 1
            elif kind == "flip_footer":
                # a flip in footer metadata the reader does not use (a statistic,
                # created_by): harmless only if every row reads back unchanged
                clean = dst / ("clean" + file.suffix)
                _write_rows(clean, rows)
                assert got[0] == load(clean, dst), f"{name} {how}: loaded changed rows silently"
                silent[kind_label + " (footer flip, rows unchanged)"] += 1
            else:
                assert kind == "truncate_json" and _at_row_boundary(original, file), (
                    f"{name} {how}: loaded silently"
                )
                silent[kind_label + " (cut between rows)"] += 1
            shutil.rmtree(dst)
            n += 1
    DATA_COUNTS.update(counts)
    SILENT.update(silent)
    print(f"{label}: {n} corruptions; refused naming the file: {dict(counts)}; "
          f"valid shorter files: {dict(silent)}")
    return n


@pytest.fixture(scope="module")
def text_rows():
    from torchtitan_nemotron3.train.assets import generate_corpus

    return [{"text": t} for t in generate_corpus(24, seed=5)]


def test_fuzz_pretraining_text_files(text_rows, tmp_path):
    """Text sources of a blend (tokenized at start-up) and prepare_data.py's inputs."""
    import sys as _sys

    from torchtitan_nemotron3.data.indexed import DataFileError
    from torchtitan_nemotron3.data.prepare import prepare
    from torchtitan_nemotron3.data.sources import SourceError, TokenizedTextSource
    from torchtitan_nemotron3.train.assets import ensure_debug_assets

    _sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    from data_helpers import WordTokenizer

    tok_dir = ensure_debug_assets()[0]
    plans = TEXT_PLANS + [("c.txt", ["empty", "flip_high"], 4)]

    def blend_text(file, _):
        source = TokenizedTextSource(str(file), WordTokenizer())
        return [source[k].tolist() for k in range(len(source))]

    def prepare_input(file, dst):
        out = dst / f"out-{file.stem}" / "o"
        prepare([str(file)], tok_dir, out, progress=False)
        return (out.parent / "o.bin").read_bytes(), (out.parent / "o.idx").read_bytes()

    n = _fuzz_rows(tmp_path, text_rows, plans, blend_text, (SourceError,), 10, "blend text")
    n += _fuzz_rows(tmp_path, text_rows, plans, prepare_input, (DataFileError,), 11,
                    "prepare_data input")
    assert n == 2 * 51


def test_fuzz_sft_and_dpo_files(tmp_path):
    from torchtitan_nemotron3.dpo.assets import generate_pairs
    from torchtitan_nemotron3.dpo.pairs import PairColumns, to_pair
    from torchtitan_nemotron3.sft.assets import generate_chats
    from torchtitan_nemotron3.sft.chat_data import (
        ChatColumns,
        ChatDataError,
        to_messages,
    )
    from torchtitan_nemotron3.sft.sources import ChatSource

    def sft(file, _):
        rows = ChatSource(str(file), shuffle_seed=None).rows()
        return [to_messages(row, ChatColumns(), where) for where, row in rows]

    def dpo(file, _):
        rows = ChatSource(str(file), shuffle_seed=None).rows()
        return [to_pair(row, PairColumns(), where) for where, row in rows]

    n = _fuzz_rows(tmp_path, generate_chats(12, seed=1), TEXT_PLANS, sft, (ChatDataError,), 12, "sft")
    n += _fuzz_rows(tmp_path, generate_pairs(12, seed=2), TEXT_PLANS, dpo, (ChatDataError,), 13, "dpo")
    assert n == 2 * 47


# ------------------------------------------------ files read back on resume


def test_fuzz_dpo_reference_table(tmp_path):
    """``dpo_reference/<split>.safetensors``: a resumed precomputed-reference DPO run
    reads it back instead of recomputing; its values carry a SHA-256, so a flip in
    the data is refused too."""
    import torch

    from torchtitan_nemotron3.dpo.reference import ReferenceTable

    good = tmp_path / "good.safetensors"
    ReferenceTable(-torch.rand(20, 2, generator=torch.Generator().manual_seed(0)) * 50, "fp").save(str(good))
    rng = random.Random(14)
    counts = Counter()
    kinds = ["truncate", "flip_header", "flip", "garbage", "empty"]
    for i, (kind, _) in enumerate(_cases(rng, kinds, 30)):
        file = tmp_path / f"r{i}" / "train.safetensors"
        file.parent.mkdir()
        shutil.copy(good, file)
        how = _corrupt(file, kind, rng, header=_header_size(file))
        assert _refused(lambda: ReferenceTable.load(str(file), "fp"), file, how, (ValueError,)), (
            f"{file.name} {how}: loaded silently"
        )
        counts[kind] += 1
    DATA_COUNTS["dpo reference table"] += sum(counts.values())
    print(f"DPO reference table: refused naming the file: {dict(counts)}")
    assert sum(counts.values()) == 30


@pytest.fixture(scope="module")
def rewound_folder(dcp_step, tmp_path_factory):
    """A checkpoint folder with steps 1, 2 and a timeline.json (rewound to 1)."""
    from tests.faults.test_checkpoint_commit import _manager, _save

    base = tmp_path_factory.mktemp("timeline")
    mgr, model, ts = _manager(base, keep_latest_k=0)
    _save(mgr, model, ts, 1)
    _save(mgr, model, ts, 2)
    mgr.close()
    mgr, _, _ = _manager(base, keep_latest_k=0)
    assert mgr.load(step=1)
    mgr.close()
    assert (base / "checkpoint" / "timeline.json").is_file()
    return base


def test_fuzz_checkpoint_timeline(rewound_folder, tmp_path):
    """``timeline.json`` (the rewinds applied): read by every restart with a
    ``load_step``; refused naming it, never a bare JSON or KeyError."""
    from tests.faults.test_checkpoint_commit import _manager

    rng = random.Random(15)
    kinds = ["truncate_json", "garbage", "empty", "wrong_type"]
    n = 0
    for kind, _ in _cases(rng, kinds, 16):
        base = tmp_path / f"t{n}"
        shutil.copytree(rewound_folder, base)
        file = base / "checkpoint" / "timeline.json"
        if kind == "wrong_type":
            history = json.loads(file.read_text())
            key = rng.choice([None, "entry", "load_step", "time"])
            if key is None:
                history = rng.choice([3, "x", {"a": 1}, True])
            elif key == "entry":
                history[-1] = rng.choice([3, "x", [1], None])
            else:
                history[-1][key] = rng.choice([v for v in _wrong_json_type(history[-1][key]) if v != 3 or key != "load_step"])
            file.write_text(json.dumps(history))
            how = f"{key}: {json.dumps(history)[:60]}"
        else:
            how = _corrupt(file, kind, rng)

        def load():
            mgr, _, _ = _manager(base, keep_latest_k=0)
            try:
                mgr.load(step=1)
            finally:
                mgr.close()

        assert _refused(load, file, how, NAMED), f"{file.name} {how}: loaded silently"
        shutil.rmtree(base)
        n += 1
    DATA_COUNTS["timeline.json"] += n
    print(f"timeline.json: refused naming the file: {n}")
    assert n == 16


@pytest.fixture(scope="module")
def adapters_dcp(dcp_step, tmp_path_factory):
    """An adapters-only DCP checkpoint of a LoRA model (what a QLoRA run saves,
    ``qlora.checkpoint.AdaptersOnly``), with the commit-safe manager's manifest."""
    import torch.distributed.checkpoint as dcp

    from torchtitan_nemotron3.lora.merge import is_adapter_key
    from torchtitan_nemotron3.resilience.commit import CommitWriter

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lora"))
    from lora_testing import args_for_test, base_and_lora, lora_config

    args = args_for_test(3)
    _, lora = base_and_lora(args, 3)
    base = tmp_path_factory.mktemp("adapters") / "step-1"
    adapters = {k: v for k, v in lora.state_dict().items() if is_adapter_key(k)}
    # written as the manager writes it: temp folder, manifest, rename
    dcp.save(adapters, storage_writer=CommitWriter(str(base), step=1, states=["model"]),
             no_dist=True)  # fmt: skip
    assert (base / "manifest.json").is_file()
    return base, lora_config(args)


def test_fuzz_adapters_only_checkpoint(adapters_dcp, tmp_path):
    """The export path of LoRA/QLoRA adapters-only checkpoints
    (``convert_checkpoint.py dcp-to-hf --merge_into_base``, ``serve``): with the
    manifest every corruption is refused naming the file; without it (a plain
    TorchTitan save) truncated and empty files are, a changed value is not (DCP
    has no checksums)."""
    from torchtitan_nemotron3.lora.export import load_lora_adapters
    from torchtitan_nemotron3.resilience.manifest import CheckpointCorruptError

    src, config = adapters_dcp
    distcp = sorted(n for n in os.listdir(src) if n.endswith(".distcp"))[0]
    rng = random.Random(16)
    plans = [
        (".metadata", ["truncate", "flip", "garbage", "empty"], 12, True),
        (distcp, ["truncate", "flip", "garbage", "empty"], 12, True),
        (".metadata", ["truncate", "garbage", "empty"], 6, False),
        (distcp, ["truncate", "empty"], 4, False),
    ]
    counts = Counter()
    n = 0
    for name, kinds, count, with_manifest in plans:
        for kind, _ in _cases(rng, kinds, count):
            dst = tmp_path / f"a{n}" / "step-1"
            shutil.copytree(src, dst)
            if not with_manifest:
                (dst / "manifest.json").unlink()
            file = dst / name
            how = _corrupt(file, kind, rng)
            assert _refused(lambda: load_lora_adapters(dst, config), file, how,
                            (ValueError, CheckpointCorruptError)), f"{name} {how}: loaded silently"
            label = name if name.startswith(".") else Path(name).suffix
            counts[label + ("" if with_manifest else " (no manifest)")] += 1
            n += 1
    DATA_COUNTS["adapters-only DCP"] += n
    print(f"adapters-only DCP: refused naming the file: {dict(counts)}")
    assert n == 34


def test_an_emptied_file_among_others_is_named(text_rows, tmp_path):
    """A directory of inputs with one file truncated to 0 bytes: refused naming
    that file by every text reader (not skipped as a file without rows)."""
    from torchtitan_nemotron3.data.indexed import DataFileError
    from torchtitan_nemotron3.data.prepare import prepare
    from torchtitan_nemotron3.data.sources import SourceError, TokenizedTextSource
    from torchtitan_nemotron3.sft.assets import generate_chats
    from torchtitan_nemotron3.sft.chat_data import ChatDataError
    from torchtitan_nemotron3.sft.sources import ChatSource
    from torchtitan_nemotron3.train.assets import ensure_debug_assets

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    from data_helpers import WordTokenizer

    tok_dir = ensure_debug_assets()[0]
    for ext in (".jsonl", ".json"):
        text, chat = tmp_path / f"text{ext}", tmp_path / f"chat{ext}"
        for d, rows in ((text, text_rows), (chat, generate_chats(4, seed=1))):
            d.mkdir()
            _write_rows(d / f"train-a{ext}", rows[:2])
            (d / f"train-b{ext}").write_bytes(b"")
            _write_rows(d / f"train-c{ext}", rows[2:])
        empty_text, empty_chat = text / f"train-b{ext}", chat / f"train-b{ext}"
        for load, file, errors in [
            (lambda: TokenizedTextSource(str(text), WordTokenizer()), empty_text, (SourceError,)),
            (lambda: prepare([str(text)], tok_dir, tmp_path / f"o{ext}" / "o", progress=False),
             empty_text, (DataFileError,)),
            (lambda: ChatSource(str(chat)), empty_chat, (ChatDataError,)),
        ]:
            assert _refused(load, file, "emptied", errors), f"{file}: skipped silently"


@pytest.fixture(scope="module")
def qlora_base(tmp_path_factory):
    """The HF checkpoint a QLoRA run re-reads as its NF4 base on every (re)start."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lora"))
    from qlora_testing import build, debug_config

    path = tmp_path_factory.mktemp("qlora") / "hf"
    save_pretrained(build(debug_config(None)), path, dtype=torch.bfloat16)
    return path


def test_fuzz_qlora_base_checkpoint(qlora_base, tmp_path):
    """``qlora.load.load_nf4_base`` (the restart path of a QLoRA run: adapters
    from the DCP step, base from ``initial_load_path``): each corruption of the
    base's ``model.safetensors`` refused naming the file (the model config is
    the job's: its ``config.json`` is not read here)."""
    import torch
    from qlora_testing import debug_config

    from torchtitan_nemotron3.qlora.load import load_nf4_base

    pytest.importorskip("torchao")
    rng = random.Random(17)
    plans = [("model.safetensors", ["truncate", "flip_header", "garbage", "empty"], 12)]
    n = 0
    for name, kinds, count in plans:
        for kind, _ in _cases(rng, kinds, count):
            dst = tmp_path / f"q{n}"
            shutil.copytree(qlora_base, dst)
            file = dst / name
            how = _corrupt(file, kind, rng, header=_header_size(file))

            def load():
                with torch.device("meta"):
                    model = debug_config(8, 16.0).build()
                load_nf4_base(model, dst)

            assert _refused(load, file, how, NAMED), f"{name} {how}: loaded silently"
            shutil.rmtree(dst)
            n += 1
    DATA_COUNTS["QLoRA base"] += n
    print(f"QLoRA base: refused naming the file: {n}")
    assert n == 12
