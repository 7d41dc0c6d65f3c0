"""The TorchTitan path end to end, through run_train.sh (the colleague's harness).

A debug run starts from a transformers-written checkpoint of the debug flavor
(``checkpoint.initial_load_in_hf``), trains one step with lr 0 and exports with
``checkpoint.last_save_in_hf``. Its first-step loss must equal transformers' loss
on the same batch (TorchTitan packs documents and our model keeps them apart, so
transformers runs each document separately), and the export (TorchTitan writes the
safetensors, ``NemotronHTrainer`` adds config.json and the tokenizer) must load into
transformers as it is, with the weights it started from; only the MoE correction
bias moves (aux-loss-free update, rate 1e-3).
"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration  # torchrun through run_train.sh

transformers = pytest.importorskip("transformers")

from hf_checkpoints import (  # noqa: E402
    first_batch,
    read_tensors,
    save_transformers_checkpoint,
    transformers_loss,
)

from torchtitan_nemotron3.model import flavor_args  # noqa: E402
from torchtitan_nemotron3.train.assets import ensure_debug_assets  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "tests" / "train" / "_harness.py"
if not HARNESS.exists() or not (REPO / "run_train.sh").exists():
    pytest.skip(
        "the training harness (tests/train/_harness.py) is not there",
        allow_module_level=True,
    )

SEQ_LEN, BATCH = 256, 4
JOB_TOML = f"""\
[job]
config = "nemotron3_debugmodel"
debug_assets = true

[training]
local_batch_size = {BATCH}
seq_len = {SEQ_LEN}
steps = 1
mixed_precision_param = "float32"

[metrics]
log_freq = 1

[[optimizer.param_groups]]
pattern = ".*"
optimizer_name = "AdamW"
optimizer_kwargs = {{lr = 0.0, weight_decay = 0.0}}
"""


def _harness():
    spec = importlib.util.spec_from_file_location("_harness", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_initial_load_in_hf_and_last_save_in_hf(tmp_path):
    args = flavor_args("debugmodel")
    src = save_transformers_checkpoint(tmp_path / "hf", args, seed=0)
    job = tmp_path / "job.toml"
    job.write_text(JOB_TOML)
    dump = tmp_path / "outputs"
    losses = _harness().run_training(
        job,
        1,
        [
            "--dump_folder",
            str(dump),
            "--checkpoint.enable",
            "--checkpoint.initial_load_path",
            str(src),
            "--checkpoint.initial_load_in_hf",
            "--checkpoint.initial_load_model_only",
            "--checkpoint.last_save_in_hf",
            "--checkpoint.last_save_model_only",
            "--checkpoint.export_dtype",
            "float32",
        ],
        tmp_path / "run",
    )
    reference = transformers_loss(src, *first_batch(SEQ_LEN, BATCH))
    assert len(losses) == 1
    assert abs(reference - math.log(args.vocab_size)) > 0.1  # not an untrained model
    assert losses[0] == pytest.approx(reference, abs=2e-5)  # the log prints 5 decimals

    export = dump / "checkpoint" / "step-1"
    tokenizer_dir, _ = ensure_debug_assets()  # the run's hf_assets_path
    # NemotronHTrainer completed TorchTitan's safetensors-only export.
    assert (export / "config.json").is_file() and (export / "tokenizer.json").is_file()
    text = "The cat sat on the mat."
    assert transformers.AutoTokenizer.from_pretrained(export)(text) == (
        transformers.AutoTokenizer.from_pretrained(tokenizer_dir)(text)
    )
    _, info = transformers.AutoModelForCausalLM.from_pretrained(
        export, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    exported, original = read_tensors(export), read_tensors(src)
    assert sorted(exported) == sorted(original)
    for name, t in original.items():
        assert exported[name].dtype == t.dtype, name
        if name.endswith("e_score_correction_bias"):
            # TorchTitan's step: coeff * sign(load error), re-centred to zero mean
            assert 0 < (exported[name] - t).abs().max() <= 2e-3, name
        else:
            assert torch.equal(exported[name], t), name
