"""Offline debug assets: deterministic, cached, atomic, and usable by TorchTitan."""

import hashlib
import json
import threading
from pathlib import Path

import pytest

from torchtitan_nemotron3.train import assets

NAME = "v1-docs3000-vocab2048-seed1234"
# The debug run's losses depend on these bytes: a change needs a new ASSETS_VERSION.
SHA256 = {
    "dataset/train.jsonl": "f8c6ffaee7d3cbfaa66ad2cccd444286fe91ce12fcc5d1576b67d46dcbe32110",
    "tokenizer/tokenizer.json": "d32b5d766c45dcf9b01a3f2f97276b43d694f46f09a280f8edaa863e656fbe02",
    "tokenizer/tokenizer_config.json": "1b230bb02f10981a885defdfa14a97bf7cd7b151faf80a29bab637859f81e628",
}


def files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file()
    }


def test_corpus_is_deterministic_english():
    a = assets.generate_corpus(num_docs=200, seed=3)
    assert assets.generate_corpus(num_docs=200, seed=3) == a
    assert assets.generate_corpus(num_docs=200, seed=4) != a
    text = " ".join(a)
    assert text.isascii()
    for word in (" the ", " and ", " plus ", " went to "):
        assert word in text


@pytest.fixture(scope="module")
def debug_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets").resolve()
    return root, assets.ensure_debug_assets(root)


def test_assets_are_the_known_bytes(debug_assets):
    root, (tok_dir, data_dir) = debug_assets
    assert (tok_dir, data_dir) == (f"{root}/{NAME}/tokenizer", f"{root}/{NAME}/dataset")
    digests = {
        name.removeprefix(f"{NAME}/"): hashlib.sha256(data).hexdigest()
        for name, data in files(root).items()
    }
    assert digests == SHA256


def test_cached_assets_are_reused_untouched(debug_assets):
    root, dirs = debug_assets
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert assets.ensure_debug_assets(root) == dirs
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_concurrent_writers_leave_one_complete_directory(debug_assets, tmp_path):
    """Writers racing on an empty root each build in a temporary directory; every
    one returns the same paths, and only the finished directory remains."""
    root, _ = debug_assets
    start, results = threading.Barrier(3), []

    def writer():
        start.wait()
        results.append(assets.ensure_debug_assets(tmp_path))

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 3
    assert [p.name for p in tmp_path.iterdir()] == [NAME]
    assert files(tmp_path) == files(root)


def test_torchtitan_tokenizer_round_trip(debug_assets):
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    _, (tok_dir, data_dir) = debug_assets
    tok = HuggingFaceTokenizer(tokenizer_path=tok_dir)
    assert tok.get_vocab_size() == assets.VOCAB_SIZE
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    with open(f"{data_dir}/train.jsonl") as f:
        doc = json.loads(f.readline())["text"]
    for text in (doc, "Unseen words: Zürich, naïve café, 3.14159 & emoji-free tabs\t!"):
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert all(0 <= i < assets.VOCAB_SIZE for i in ids)
        assert tok.decode(ids[1:-1]) == text
    # the BPE learned the corpus: far fewer tokens than bytes
    assert len(tok.encode(doc)) < len(doc.encode()) / 3


def test_dataset_loads_as_torchtitan_c4_test(debug_assets):
    from torchtitan.hf_datasets.text_datasets import _validate_dataset

    _, (_, data_dir) = debug_assets
    path, loader, text_of = _validate_dataset("c4_test", data_dir)
    ds = loader(path)
    assert len(ds) == assets.NUM_DOCS
    assert text_of(ds[0]) == assets.generate_corpus(num_docs=1)[0]


def test_use_debug_assets_sets_trainer_fields(debug_assets):
    from torchtitan.trainer import Trainer

    root, (tok_dir, data_dir) = debug_assets
    config = Trainer.Config()
    assets.use_debug_assets(config, root)
    assert config.hf_assets_path == tok_dir
    assert (config.dataloader.dataset, config.dataloader.dataset_path) == (
        "c4_test",
        data_dir,
    )
