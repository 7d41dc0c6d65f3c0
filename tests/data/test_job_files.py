"""Job files and the pretraining loader: blends from TOML and the command line,
one config-time line (with the prepare_data.py command) when the data is absent,
and the debug job's pre-tokenized corpus."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from torchtitan_nemotron3.data.pretrain import PretrainDataLoader
from torchtitan_nemotron3.data.validation import NamedSetsValidator
from torchtitan_nemotron3.train.__main__ import check_config
from torchtitan_nemotron3.train.toml_config import ConfigError, load_job

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("job", ["nemotron3-nano-30B.toml", "nemotron3-super-120B.toml"])
def test_continued_pretraining_jobs_take_a_blend(job, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = str(REPO / "train_configs" / job)
    config, source_of = load_job(path, [])
    assert isinstance(config.dataloader, PretrainDataLoader.Config)
    assert config.dataloader.blend == "./data/train_text_document"
    assert config.dataloader.vocab_size == config.model_spec.model.vocab_size == 131072
    assert isinstance(config.validator, NamedSetsValidator.Config)
    assert config.validator.dataloader.vocab_size == 131072
    with pytest.raises(ConfigError) as e:
        check_config(config, source_of)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: dataloader.blend: ")
    assert "./data/train_text_document.bin/.idx not found" in msg
    assert "python scripts/prepare_data.py" in msg
    assert "--output_prefix ./data/train_text_document" in msg
    blend = "0.7 ./data/web_text_document 0.3 ./data/code_text_document"
    config, source_of = load_job(path, ["--dataloader.blend", blend])
    assert config.dataloader.blend == blend
    with pytest.raises(ConfigError, match=r"^command line: dataloader.blend: ./data/web_text_document.bin/.idx not found"):
        check_config(config, source_of)
    with pytest.raises(ConfigError, match="weight -1 of a must be finite and > 0"):
        load_job(path, ["--dataloader.blend", "-1 a 2 b"])


def test_validation_sets_are_checked_at_config_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = str(REPO / "train_configs" / "nemotron3-nano-30B.toml")
    (tmp_path / "data").mkdir()
    for s in (".bin", ".idx"):
        (tmp_path / "data" / f"train_text_document{s}").write_bytes(b"")
    argv = ["--validator.enable", "--validator.sets", "web=./data/web_valid"]
    config, source_of = load_job(path, argv)
    assert config.validator.sets == ["web=./data/web_valid"]
    with pytest.raises(ConfigError, match=r"^command line: validator.sets: ./data/web_valid.bin/.idx not found"):
        check_config(config, source_of)
    with pytest.raises(ConfigError, match="'web' is not 'name=<prefix or blend>'"):
        load_job(path, ["--validator.sets", "web"])


def test_debug_job_reads_the_pretokenized_debug_corpus():
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from torchtitan_nemotron3.config_registry import nemotron3_debugmodel
    from torchtitan_nemotron3.data.indexed import IndexedDataset
    from torchtitan_nemotron3.train import assets

    config = nemotron3_debugmodel()
    assert isinstance(config.dataloader, PretrainDataLoader.Config)
    tok_dir, prefix = assets.ensure_debug_pretokenized()
    assert config.dataloader.blend == prefix and config.hf_assets_path == tok_dir
    data = IndexedDataset(prefix)
    tokenizer = HuggingFaceTokenizer(tokenizer_path=tok_dir)
    texts = assets.generate_corpus(num_docs=5)
    assert len(data) == assets.NUM_DOCS
    for i, text in enumerate(texts):  # each document: the text's tokens, then EOS
        assert data[i].tolist() == tokenizer.encode(text, add_bos=False, add_eos=True)
        assert data[i][-1] == tokenizer.eos_id and tokenizer.bos_id not in data[i].tolist()


def test_validator_without_sets_reads_the_held_out_documents(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = str(REPO / "train_configs" / "nemotron3-nano-30B.toml")
    blend = "0.5 ./data/a 0.5 ./data/b"
    config, _ = load_job(path, ["--dataloader.blend", blend, "--dataloader.valid_fraction",
                                "0.01", "--validator.enable"])
    v = config.validator.dataloader
    assert (v.blend, v.valid_fraction, v.split) == (blend, 0.01, "valid")
    assert config.dataloader.split == "train"
    with pytest.raises(ConfigError, match="validator: no held-out data; set validator.sets"):
        load_job(path, ["--validator.enable"])
    # TorchTitan's list[str] on the command line: comma-separated
    config, _ = load_job(path, ["--validator.enable", "--validator.sets", "a=./x,b=0.5 ./y 0.5 ./z"])
    assert config.validator.sets == ["a=./x", "b=0.5 ./y 0.5 ./z"]


def test_resume_on_other_data_is_refused_before_any_rank_starts(tmp_path, monkeypatch):
    """run_train.sh's one-process check reads the data state of the checkpoint
    the run would resume from and refuses other data in one line."""
    import torch.distributed.checkpoint as dcp

    monkeypatch.chdir(tmp_path)
    path = str(REPO / "train_configs" / "debug_model.toml")
    dump = ["--checkpoint.enable", "--dump_folder", str(tmp_path / "out")]
    config, source_of = load_job(path, dump)
    tokenizer = config.tokenizer.build(tokenizer_path=config.hf_assets_path)
    loader = config.dataloader.build(dp_world_size=1, dp_rank=0, tokenizer=tokenizer,
                                     seq_len=config.training.seq_len, local_batch_size=2)
    step = tmp_path / "out" / "checkpoint" / "step-2"
    dcp.save({"dataloader": loader.state_dict()}, checkpoint_id=str(step))
    check_config(config, source_of)  # the same data: no complaint
    config, source_of = load_job(path, [*dump, "--dataloader.seed", "7"])
    with pytest.raises(ConfigError) as e:
        check_config(config, source_of)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("command line: ")  # where the change came from
    assert f"{step}: resume refused: the data differs from the checkpoint's (seed: 1234 -> 7)" in msg
    config, source_of = load_job(path, [*dump, "--dataloader.seed", "7",
                                        "--dataloader.allow_data_change"])
    check_config(config, source_of)
