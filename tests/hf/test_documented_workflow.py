"""The README's Nano workflow as a user types it: download into ``./assets/hf``,
tokenize a corpus into the job's default blend with ``scripts/prepare_data.py``, then
``run_train.sh`` with the Nano job file and its relative paths, from the user's own
directory.

The Hub is a local stand-in holding a debug-sized checkpoint written by transformers
(plus the debug tokenizer) under the Nano repo id; the run swaps the 30B model for
the debug one (``--job.config``) and shrinks the step, nothing else. It must load
those weights (first loss = transformers' loss on the same batch) and leave an HF
export that transformers loads as it is.
"""

import importlib.util
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # torchrun through run_train.sh

transformers = pytest.importorskip("transformers")

from hf_checkpoints import (  # noqa: E402
    first_batch,
    save_transformers_checkpoint,
    transformers_loss,
)
from huggingface_hub import HfApi  # noqa: E402
from huggingface_hub.hf_api import ModelInfo  # noqa: E402
from huggingface_hub.utils import filter_repo_objects  # noqa: E402

from torchtitan_nemotron3.model import flavor_args  # noqa: E402
from torchtitan_nemotron3.train.assets import ensure_debug_assets  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
REPO_ID = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"
SEQ_LEN, BATCH = 256, 4


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hub holding ``REPO_ID`` = transformers' debug-flavor checkpoint + tokenizer."""
    files = tmp_path / "hub"
    save_transformers_checkpoint(files, flavor_args("debugmodel"), seed=0)
    tokenizer_dir, _ = ensure_debug_assets()
    shutil.copytree(tokenizer_dir, files, dirs_exist_ok=True)
    names = sorted(p.name for p in files.iterdir())

    def repo_info(self, repo_id, **kwargs):
        assert repo_id == REPO_ID
        return ModelInfo(id=repo_id, sha="0" * 40, siblings=[{"rfilename": n} for n in names])

    def snapshot_download(repo_id, *, local_dir, allow_patterns=None, **kwargs):
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        for name in filter_repo_objects(names, allow_patterns=allow_patterns):
            shutil.copy(files / name, Path(local_dir) / name)
        return str(local_dir)

    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    return files, snapshot_download


def test_readme_nano_workflow_with_relative_paths(tmp_path, monkeypatch, hub):
    files, fake_snapshot_download = hub
    user_dir = tmp_path / "user"
    user_dir.mkdir()
    monkeypatch.chdir(user_dir)

    download = _load(REPO / "scripts" / "download_hf_assets.py", "download_hf_assets")
    monkeypatch.setattr(download, "snapshot_download", fake_snapshot_download)
    argv = ["--repo_id", REPO_ID, "--local_dir", "./assets/hf", "--all"]
    assert download.main(argv) == 0
    assert (user_dir / "assets/hf/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16/config.json").is_file()

    # The README's next step: tokenize the corpus with the downloaded tokenizer into
    # the job file's default blend (./data/train_text_document).
    prepare = _load(REPO / "scripts" / "prepare_data.py", "prepare_data")
    assets = "./assets/hf/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"
    corpus = ensure_debug_assets()[1]
    argv = [corpus, "--tokenizer", assets, "--output_prefix", "./data/train_text_document"]
    assert prepare.main(argv) == 0
    assert (user_dir / "data/train_text_document.idx").is_file()

    harness = _load(REPO / "tests" / "train" / "_harness.py", "_harness")
    # The Nano job file as shipped: hf_assets_path, initial_load_path and dump_folder
    # relative. Only the model, the step size and the layout (one process: no
    # expert parallelism) are made CPU-sized.
    monkeypatch.setattr(harness, "REPO_ROOT", user_dir)  # run from the user's directory
    overrides = [
        "--dump_folder", "./outputs/nano-30B",
        "--job.config", "nemotron3_debugmodel",
        "--training.steps", "1",
        "--parallelism.expert_parallel_degree", "1",
        "--training.seq_len", str(SEQ_LEN),
        "--training.local_batch_size", str(BATCH),
        "--training.mixed_precision_param", "float32",
        "--checkpoint.last_save_model_only",
        "--checkpoint.export_dtype", "float32",
    ]  # fmt: skip
    losses = harness.run_training(
        REPO / "train_configs" / "nemotron3-nano-30B.toml", 1, overrides, tmp_path / "run"
    )
    blend = str(user_dir / "data/train_text_document")
    reference = transformers_loss(files, *first_batch(SEQ_LEN, BATCH, blend))
    assert losses[0] == pytest.approx(reference, abs=2e-5)  # the log prints 5 decimals

    export = user_dir / "outputs/nano-30B/checkpoint/step-1"
    model = transformers.AutoModelForCausalLM.from_pretrained(export)
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    assert model.config.num_hidden_layers == flavor_args("debugmodel").num_hidden_layers
    assert tokenizer("The cat sat.")["input_ids"]
