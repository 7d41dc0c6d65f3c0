"""Offline tokenization (scripts/prepare_data.py): what megatron-core reads back is the
tokenizer's output plus the framing, for every input kind and any number of workers;
bad input stops the run in one line naming file and row; a killed run leaves no pair."""

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from torchtitan_nemotron3.data.indexed import DataFileError, IndexedDataset
from torchtitan_nemotron3.data.prepare import iter_rows, prepare, read_manifest, resolve_inputs, Source
from torchtitan_nemotron3.train.assets import ensure_debug_assets, generate_corpus

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tok_dir():
    return ensure_debug_assets()[0]


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))


@pytest.fixture(scope="module")
def texts():
    docs = generate_corpus(num_docs=120, seed=7)
    docs[3] = "Ünïcødé — 数据 🚀 and a tab\there"  # beyond ASCII
    docs[5] = ""  # an empty text is a document of one EOS
    return docs


def write_jsonl(path, texts, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t, "id": len(t)}, ensure_ascii=False) + "\n")
    return str(path)


def expected(tokenizer, texts, bos=None):
    eos = tokenizer.token_to_id("<|end_of_text|>")
    head = [bos] if bos is not None else []
    return [head + tokenizer.encode(t, add_special_tokens=False).ids + [eos] for t in texts]


def megatron_docs(prefix):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset

        ds = MegatronDataset(str(prefix))
    assert np.array_equal(ds.document_indices, np.arange(len(ds) + 1))
    return [ds[k].tolist() for k in range(len(ds))], ds.index.dtype


@pytest.mark.parametrize("add_bos", [False, True])
def test_cli_output_read_by_megatron_is_the_tokenizers(tmp_path, tok_dir, tokenizer, texts, add_bos):
    data = write_jsonl(tmp_path / "c.jsonl", texts)
    argv = [data, "--tokenizer", tok_dir, "--output_prefix", str(tmp_path / "out" / "c"), "--no_progress"]
    assert load_script().main(argv + (["--add_bos"] if add_bos else [])) == 0
    got, dtype = megatron_docs(tmp_path / "out" / "c")
    bos = tokenizer.token_to_id("<|begin_of_text|>") if add_bos else None
    assert dtype == np.uint16  # 2048 ids
    assert got == expected(tokenizer, texts, bos)
    eos_text = "<|end_of_text|>"
    for ids, text in zip(got, texts):  # decoding gives the text, one EOS, BOS only if asked
        assert tokenizer.decode(ids, skip_special_tokens=False) == (
            ("<|begin_of_text|>" if add_bos else "") + text + eos_text
        )
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == ["c.bin", "c.idx", "c.manifest.json"]


def test_manifest(tmp_path, tok_dir, tokenizer, texts):
    data = write_jsonl(tmp_path / "c.jsonl", texts)
    r = prepare([data], tok_dir, tmp_path / "c", progress=False)
    m = read_manifest(tmp_path / "c")
    assert m == r.manifest
    with open(os.path.join(tok_dir, "tokenizer.json"), "rb") as f:
        assert m["tokenizer"]["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert m["tokenizer"] | {"path": None} == {
        "path": None,
        "sha256": m["tokenizer"]["sha256"],
        "vocab_size": 2048,
        "eos_token": "<|end_of_text|>",
        "eos_id": 1,
        "bos_token": "<|begin_of_text|>",
        "bos_id": 0,
    }
    assert m["framing"] == {"add_bos": False, "add_eos": True, "text_key": "text"}
    ds = IndexedDataset(tmp_path / "c")
    assert (m["documents"], m["tokens"], m["dtype"]) == (len(texts), ds.num_tokens, "uint16")
    assert m["files"]["bin_bytes"] == os.path.getsize(f"{tmp_path}/c.bin")
    with open(f"{tmp_path}/c.idx", "rb") as f:
        assert m["files"]["idx_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert m["sources"] == [
        {"path": data, "bytes": os.path.getsize(data), "format": "jsonl", "documents": len(texts), "bad_rows": 0}
    ]


def test_every_input_kind_in_order(tmp_path, tok_dir, tokenizer, texts):
    """jsonl, json array, json lines in a .json, parquet, txt (one document per file),
    a directory (sorted) and a glob (sorted), read in the order given."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    a, b, c, d = texts[:20], texts[20:40], texts[40:60], texts[60:80]
    write_jsonl(tmp_path / "a.jsonl", a)
    with open(tmp_path / "b.json", "w", encoding="utf-8") as f:
        json.dump([{"body": t} for t in b], f)
    write_jsonl(tmp_path / "bl.json", b, key="body")
    pq.write_table(pa.table({"body": c, "n": list(range(len(c)))}), tmp_path / "c.parquet", row_group_size=7)
    (tmp_path / "txt").mkdir()
    for k, t in enumerate(d[:3]):
        (tmp_path / "txt" / f"{k:02d}.txt").write_text(t, encoding="utf-8")
    (tmp_path / "txt" / "notes.md").write_text("ignored: not a corpus file")
    (tmp_path / "g").mkdir()
    for k in (1, 0):
        write_jsonl(tmp_path / "g" / f"part{k}.jsonl", [d[3 + k]], key="body")

    def run(inputs, key):
        prepare([str(tmp_path / i) for i in inputs], tok_dir, tmp_path / "out", text_key=key, progress=False)
        got = [ds.tolist() for ds in IndexedDataset(tmp_path / "out")]
        return got, read_manifest(tmp_path / "out")

    got, _ = run(["a.jsonl"], "text")
    assert got == expected(tokenizer, a)
    got, m = run(["c.parquet", "b.json", "bl.json", "txt", "g/part*.jsonl"], "body")
    assert got == expected(tokenizer, c + b + b + d[:3] + [d[3], d[4]])
    assert [(Path(s["path"]).name, s["format"], s["documents"]) for s in m["sources"]] == [
        ("c.parquet", "parquet", 20),
        ("b.json", "json", 20),
        ("bl.json", "json", 20),
        ("00.txt", "txt", 1),
        ("01.txt", "txt", 1),
        ("02.txt", "txt", 1),
        ("part0.jsonl", "jsonl", 1),
        ("part1.jsonl", "jsonl", 1),
    ]


def test_hub_dataset_rows(tmp_path, texts):
    """A hub id is streamed through ``datasets``; offline, a local dataset directory
    stands in for the id (the same load_dataset(..., streaming=True) call)."""
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "ds" / "train.jsonl", texts[:30])
    [src] = resolve_inputs(["nvidia/Nemotron-CC-v2"], hub_config="High-Quality", split="train")
    assert (src.kind, src.name, src.config) == ("hub", "nvidia/Nemotron-CC-v2", "High-Quality")
    rows = list(iter_rows(Source("hub", str(tmp_path / "ds")), "text"))
    assert [t for _, t in rows] == texts[:30]
    assert rows[2][0] == f"{tmp_path / 'ds'}: row 3"
    rows = list(iter_rows(Source("hub", str(tmp_path / "ds")), "body"))
    assert isinstance(rows[0][1], DataFileError) and "no 'body' field" in str(rows[0][1])


def test_config_file_names_the_tokenizer(tmp_path, tok_dir):
    job = tmp_path / "job.toml"
    job.write_text(f'hf_assets_path = "{tok_dir}"\n[job]\nconfig = "nemotron3_debugmodel"\n')
    assert load_script().tokenizer_from_job_file(str(job)) == tok_dir


# ------------------------------------------------------------------ bad input


def _bad_inputs(tmp_path):
    def jsonl_lines(name, lines):
        p = tmp_path / name
        p.write_bytes(b"\n".join(lines) + b"\n")
        return str(p)

    ok = json.dumps({"text": "fine"}).encode()
    return {
        "missing_field": (jsonl_lines("m.jsonl", [ok, b"", json.dumps({"body": "x"}).encode()]),
                          r"m\.jsonl: row 2 \(line 3\): no 'text' field \(fields: body\)"),
        "non_string": (jsonl_lines("n.jsonl", [ok, json.dumps({"text": ["a"]}).encode()]),
                       r"n\.jsonl: row 2 \(line 2\): 'text' is list, not a string"),
        "bad_utf8_jsonl": (jsonl_lines("u.jsonl", [ok, b'{"text": "caf\xe9"}']),
                           r"u\.jsonl: row 2 \(line 2\): not valid UTF-8"),
        "bad_json": (jsonl_lines("j.jsonl", [ok, b'{"text": "x"']), r"j\.jsonl: row 2 \(line 2\): invalid JSON"),
        "bad_utf8_txt": (str(tmp_path / "t.txt"), r"t\.txt: not valid UTF-8 \(byte 3"),
        "null_parquet": (str(tmp_path / "p.parquet"), r"p\.parquet: row 2: 'text' is null, not a string"),
        "no_column": (str(tmp_path / "q.parquet"), r"q\.parquet: no 'text' column \(columns: body\)"),
        "missing_input": (str(tmp_path / "absent.jsonl"), r"absent\.jsonl: no such file or directory"),
        "empty_corpus": (jsonl_lines("e.jsonl", [b"", b"  "]), r"e\.jsonl: empty corpus, no documents"),
        "empty_dir": (str(tmp_path / "emptydir"), r"emptydir: no \.jsonl, \.json, \.parquet, \.txt files"),
        "no_glob_match": (str(tmp_path / "nothing*.jsonl"), r"nothing\*\.jsonl: no file matches"),
        "wrong_type": (str(tmp_path / "x.csv"), r"x\.csv: unsupported file type \.csv"),
    }


def _make_bad_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "t.txt").write_bytes(b"abc\xff\xfe")
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "p.parquet")
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "q.parquet")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "x.csv").write_text("text\nhello\n")


@pytest.mark.parametrize(
    "kind",
    ["missing_field", "non_string", "bad_utf8_jsonl", "bad_json", "bad_utf8_txt", "null_parquet",
     "no_column", "missing_input", "empty_corpus", "empty_dir", "no_glob_match", "wrong_type"],
)
def test_bad_input_is_refused_naming_file_and_row(tmp_path, tok_dir, kind):
    _make_bad_files(tmp_path)
    path, pattern = _bad_inputs(tmp_path)[kind]
    with pytest.raises(DataFileError, match=pattern) as err:
        prepare([path], tok_dir, tmp_path / "out" / "o", progress=False)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
    out = tmp_path / "out"
    assert not out.exists() or os.listdir(out) == []  # nothing written, no temporaries


def test_skip_bad_rows_counts_and_reports(tmp_path, tok_dir, tokenizer, capsys):
    _make_bad_files(tmp_path)
    bad = _bad_inputs(tmp_path)
    inputs = [bad[k][0] for k in ("missing_field", "non_string", "bad_utf8_jsonl", "null_parquet")]
    argv = [*inputs, "--tokenizer", tok_dir, "--output_prefix", str(tmp_path / "o"), "--no_progress"]
    assert load_script().main(argv + ["--workers", "1"]) == 2  # stops without the flag
    assert "m.jsonl: row 2 (line 3): no 'text' field" in capsys.readouterr().err
    assert load_script().main(argv + ["--skip_bad_rows"]) == 0
    err = capsys.readouterr().err
    assert "skipped 4 bad rows" in err and "u.jsonl: row 2 (line 2)" in err
    m = read_manifest(tmp_path / "o")
    assert m["bad_rows"]["count"] == 4 and [s["bad_rows"] for s in m["sources"]] == [1, 1, 1, 1]
    got = [d.tolist() for d in IndexedDataset(tmp_path / "o")]
    assert got == expected(tokenizer, ["fine", "fine", "fine", "a"])


# ------------------------------------------------------ processes (integration)


@pytest.mark.integration
def test_workers_give_byte_identical_files(tmp_path, tok_dir, texts):
    data = write_jsonl(tmp_path / "c.jsonl", texts * 3)
    for n in (1, 2):
        r = prepare([data], tok_dir, tmp_path / f"w{n}", workers=n, chunk_docs=7, progress=False)
        assert r.documents == 3 * len(texts)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()


@pytest.mark.integration
def test_sigkilled_run_leaves_no_pair(tmp_path, tok_dir):
    """A real prepare_data.py process killed while it writes the tokens: the prefix
    holds nothing a reader accepts (only hidden temporaries)."""
    data = write_jsonl(tmp_path / "big.jsonl", generate_corpus(num_docs=3000, seed=11) * 4)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), data, "--tokenizer", tok_dir,
         "--output_prefix", str(out / "big"), "--no_progress", "--chunk_docs", "16"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            tmps = [p for p in out.glob(".big.*.bin.tmp")] if out.exists() else []
            if tmps and tmps[0].stat().st_size > 0:  # tokens on disk, not committed
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not any(out.glob("big.*")), sorted(os.listdir(out))
    with pytest.raises(DataFileError, match="missing"):
        IndexedDataset(out / "big")
    assert all(p.name.startswith(".big.") and p.name.endswith(".tmp") for p in out.iterdir())


def test_output_dir_name_and_eos_token(tmp_path, tok_dir, tokenizer, texts):
    data = write_jsonl(tmp_path / "c.jsonl", texts[:10])
    argv = [data, "--tokenizer", tok_dir, "--output_dir", str(tmp_path / "o"), "--name", "n",
            "--eos_token", "<|pad|>", "--no_progress"]
    assert load_script().main(argv) == 0
    got = [d.tolist() for d in IndexedDataset(tmp_path / "o" / "n")]
    pad = tokenizer.token_to_id("<|pad|>")
    assert got == [tokenizer.encode(t, add_special_tokens=False).ids + [pad] for t in texts[:10]]
    assert read_manifest(tmp_path / "o" / "n")["tokenizer"]["eos_id"] == pad
    with pytest.raises(DataFileError, match=r"tokenizer\.json: eos_token '<\|nope\|>' is not in the vocabulary"):
        prepare([data], tok_dir, tmp_path / "x", eos_token="<|nope|>", progress=False)
