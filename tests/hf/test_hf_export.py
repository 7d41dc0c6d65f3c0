"""Exports a user can use: transformers' AutoTokenizer and AutoModelForCausalLM load
them (tokenizer, chat template and generation config copied from the source), and a
Hub repo id works where a directory does, through the Hugging Face cache, offline."""

import os
import shutil
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from hf_checkpoints import (  # noqa: E402
    assert_same_tensors,
    save_transformers_checkpoint,
    tiny_args,
    write_tiny_assets,
)

from torchtitan_nemotron3 import from_pretrained, save_pretrained  # noqa: E402

REPO_ID = "acme/tiny-nemotron"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A transformers checkpoint with the tokenizer files of a hub repo beside it."""
    root = tmp_path_factory.mktemp("export")
    src = save_transformers_checkpoint(root / "hf", tiny_args(0), seed=0)
    assets = write_tiny_assets(root / "assets")
    for name in os.listdir(assets):
        shutil.copy(os.path.join(assets, name), src)
    return src


def test_export_loads_with_autotokenizer_and_automodel(source, tmp_path):
    out = tmp_path / "out"
    save_pretrained(from_pretrained(source), out, assets_dir=source)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "generation_config.json",
    ):
        assert (out / name).read_bytes() == (Path(source) / name).read_bytes()

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    reference = transformers.AutoTokenizer.from_pretrained(source)
    text = "hello mamba world"
    assert tokenizer(text)["input_ids"] == reference(text)["input_ids"] == [3, 4, 5]
    chat = [{"role": "user", "content": "hello world"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == (
        reference.apply_chat_template(chat, tokenize=False)
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.generation_config.max_new_tokens == 7
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 2


def populate_cache(cache, src) -> None:
    """The layout snapshot_download leaves: refs/main → snapshots/<commit>/files."""
    repo = cache / ("models--" + REPO_ID.replace("/", "--"))
    shutil.copytree(src, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty HF cache, and no network for huggingface_hub (offline mode)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_from_the_cache(source, offline_cache, tmp_path):
    populate_cache(offline_cache, source)
    model = from_pretrained(REPO_ID)
    assert_same_tensors(model.state_dict(), from_pretrained(source).state_dict())
    save_pretrained(model, tmp_path / "out", assets_dir=REPO_ID)
    assert (tmp_path / "out" / "tokenizer.json").exists()


def test_hub_id_offline_and_not_cached_is_one_line(offline_cache):
    with pytest.raises(FileNotFoundError) as excinfo:
        from_pretrained(REPO_ID)
    message = str(excinfo.value)
    assert "\n" not in message
    assert repr(REPO_ID) in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained("./no/such/dir")  # a path, never looked up on the Hub
