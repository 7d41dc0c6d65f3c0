"""Offline debug assets: deterministic corpus + tokenizer usable by TorchTitan."""

import json

import pytest

from torchtitan_nemotron3.train import assets


def test_corpus_is_deterministic_english():
    a = assets.generate_corpus(num_docs=200, seed=3)
    b = assets.generate_corpus(num_docs=200, seed=3)
    assert a == b
    assert assets.generate_corpus(num_docs=200, seed=4) != a
    text = " ".join(a)
    assert text.isascii()
    for word in (" the ", " and ", " plus ", " went to "):
        assert word in text


@pytest.fixture(scope="module")
def debug_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return root, assets.ensure_debug_assets(root)


def test_layout_and_idempotence(debug_assets):
    root, (tok_dir, data_dir) = debug_assets
    files = sorted(p.name for p in root.rglob("*") if p.is_file())
    assert files == ["tokenizer.json", "tokenizer_config.json", "train.jsonl"]
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert assets.ensure_debug_assets(root) == (tok_dir, data_dir)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before
    # no temporary directories left behind
    name = (
        f"v{assets.ASSETS_VERSION}-docs{assets.DEFAULT_NUM_DOCS}"
        f"-vocab{assets.DEFAULT_VOCAB_SIZE}-seed{assets.DEFAULT_SEED}"
    )
    assert [p.name for p in root.iterdir()] == [name]


def test_generation_is_byte_identical(debug_assets, tmp_path):
    _, (tok_dir, data_dir) = debug_assets
    tok2, data2 = assets.ensure_debug_assets(tmp_path)
    for a, b in (
        (f"{tok_dir}/tokenizer.json", f"{tok2}/tokenizer.json"),
        (f"{tok_dir}/tokenizer_config.json", f"{tok2}/tokenizer_config.json"),
        (f"{data_dir}/train.jsonl", f"{data2}/train.jsonl"),
    ):
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read() == fb.read(), a


def test_torchtitan_tokenizer_round_trip(debug_assets):
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    _, (tok_dir, data_dir) = debug_assets
    tok = HuggingFaceTokenizer(tokenizer_path=tok_dir)
    assert tok.get_vocab_size() == assets.DEFAULT_VOCAB_SIZE
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    with open(f"{data_dir}/train.jsonl") as f:
        doc = json.loads(f.readline())["text"]
    for text in (doc, "Unseen words: Zürich, naïve café, 3.14159 & emoji-free tabs\t!"):
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert all(0 <= i < assets.DEFAULT_VOCAB_SIZE for i in ids)
        assert tok.decode(ids[1:-1]) == text
    # the BPE learned the corpus: far fewer tokens than bytes
    assert len(tok.encode(doc)) < len(doc.encode()) / 3


def test_dataset_loads_as_torchtitan_c4_test(debug_assets):
    from torchtitan.hf_datasets.text_datasets import _validate_dataset

    _, (_, data_dir) = debug_assets
    path, loader, text_of = _validate_dataset("c4_test", data_dir)
    ds = loader(path)
    assert len(ds) == assets.DEFAULT_NUM_DOCS
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
