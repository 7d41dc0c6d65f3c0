"""TOML job files -> TorchTitan's own command line -> Trainer.Config.

In-process tests use the test-only ``qwen3_tiny`` base (no NemotronH dependency) and
only build configs; the ``integration`` ones run the entry point as a subprocess.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from _harness import REPO_ROOT
from torchtitan.config import ConfigManager
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

from torchtitan_nemotron3.train.__main__ import check_config
from torchtitan_nemotron3.train.toml_config import ConfigError, load_job

QWEN3 = ["--module", "tests.train.qwen3_debug_config", "--config", "qwen3_tiny"]
JOB = '[job]\nmodule = "tests.train.qwen3_debug_config"\nconfig = "qwen3_tiny"\n'

SETTINGS = """
[training]
steps = 7
max_norm = 0.5
dtype = "bfloat16"
[compile]
enable = true
components = ["model", "loss"]
[metrics]
enable_tensorboard = false
[parallelism]
module_fqns_per_model_part = [["tok_embeddings", "layers.0"], ["layers.1", "norm"]]
[lr_scheduler]
decay_ratio = "None"
[activation_checkpoint]
mode = "full"
debug = true
[[optimizer.param_groups]]
pattern = ".*"
optimizer_kwargs = { lr = 1e-3, betas = [0.8, 0.9] }
"""
# The same job in TorchTitan's (tyro's) spelling; the subcommand comes last.
SETTINGS_CLI = [
    "--training.steps", "7", "--training.max-norm", "0.5", "--training.dtype", "bfloat16",
    "--compile.enable", "--compile.components", "model,loss",
    "--metrics.no-enable-tensorboard",
    "--parallelism.module-fqns-per-model-part", "tok_embeddings,layers.0", "layers.1,norm",
    "--lr-scheduler.decay-ratio", "None",
    "--optimizer.param-groups.0.pattern", ".*",
    "--optimizer.param-groups.0.optimizer-kwargs.lr", "0.001",
    "--optimizer.param-groups.0.optimizer-kwargs.betas", "0.8", "0.9",
    "activation-checkpoint:full", "--activation-checkpoint.debug",
]  # fmt: skip


def write(tmp_path, body: str, top: str = "", job: str = JOB):
    path = tmp_path / "job.toml"
    path.write_text(top + job + textwrap.dedent(body))
    return path


def resolved(config) -> str:  # (functions in the model config differ only by address)
    return re.sub(
        r" at 0x\w+", "", json.dumps(config.to_dict(), sort_keys=True, default=str)
    )


def error_of(path, argv=(), check=False) -> str:
    with pytest.raises(ConfigError) as info:
        config, source_of = load_job(path and str(path), list(argv))
        if check:
            check_config(config, source_of)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_toml_values_reach_config(tmp_path):
    config, source_of = load_job(str(write(tmp_path, SETTINGS)), [])
    assert config.training.steps == 7 and config.training.dtype == "bfloat16"
    assert config.compile.enable and config.compile.components == ["model", "loss"]
    assert config.parallelism.module_fqns_per_model_part[1] == ["layers.1", "norm"]
    assert config.lr_scheduler.decay_ratio is None
    assert type(config.activation_checkpoint) is FullAC.Config
    assert config.activation_checkpoint.debug is True
    (group,) = config.optimizer.param_groups
    assert (
        group.optimizer_kwargs["lr"] == 1e-3 and group.optimizer_kwargs["eps"] == 1e-8
    )
    assert config.training.seq_len == 128  # untouched: the base function's value
    assert source_of("training.steps") == str(tmp_path / "job.toml")
    assert (
        source_of("training.seq_len") == "tests.train.qwen3_debug_config:qwen3_tiny()"
    )


def test_toml_equals_command_line_equals_torchtitan(tmp_path):
    from_toml, _ = load_job(str(write(tmp_path, SETTINGS)), [])
    from_cli, _ = load_job(None, [*QWEN3, *SETTINGS_CLI])
    from_torchtitan = ConfigManager().parse_args([*QWEN3, *SETTINGS_CLI])
    assert resolved(from_toml) == resolved(from_cli) == resolved(from_torchtitan)


def test_command_line_wins_and_mode_alias(tmp_path):
    path = write(tmp_path, SETTINGS)
    config, source_of = load_job(
        str(path), ["--training.steps", "3", "--compile.no_enable"]
    )
    assert config.training.steps == 3 and config.compile.enable is False
    assert source_of("training.steps") == "command line"
    # A new variant starts from its defaults: the file's `debug = true` is dropped.
    config, _ = load_job(str(path), ["--activation_checkpoint.mode", "selective"])
    assert type(config.activation_checkpoint) is SelectiveAC.Config
    assert config.activation_checkpoint.debug is False
    config, _ = load_job(str(path), ["activation-checkpoint:none"])
    assert config.activation_checkpoint is None


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(
        tmp_path,
        '[checkpoint]\ninitial_load_path = "./assets/hf/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"\n',
        top='dump_folder = "out"\nhf_assets_path = "gs://bucket/tok"\n',
    )
    argv = [
        "--dataloader.dataset_path",
        "data/jsonl",
        "--validator.dataloader.dataset_path=v",
    ]
    config, _ = load_job(str(path), argv)
    assert config.checkpoint.initial_load_path == str(
        tmp_path / "assets/hf/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"
    )
    assert config.dump_folder == str(tmp_path / "out")
    assert config.dataloader.dataset_path == str(tmp_path / "data/jsonl")
    assert config.validator.dataloader.dataset_path == str(tmp_path / "v")
    assert config.hf_assets_path == "gs://bucket/tok"  # remote: as written


def test_old_job_keys_still_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHTITAN_NEMOTRON3_ASSETS", str(tmp_path / "assets"))
    job = JOB + 'description = "free text"\ndebug_assets = true\n'
    config, _ = load_job(str(write(tmp_path, "", job=job)), [])
    assert config.hf_assets_path.startswith(str(tmp_path / "assets"))
    assert config.dataloader.dataset == "c4_test"
    assert config.dataloader.dataset_path.startswith(str(tmp_path / "assets"))
    # The old default module spelling and --job.* overrides.
    job = '[job]\nmodule = "torchtitan_nemotron3.config_registry"\nconfig = "nope"\n'
    argv = [
        "--job.module",
        "tests.train.qwen3_debug_config",
        "--job.config",
        "qwen3_tiny",
    ]
    assert (
        load_job(str(write(tmp_path, "", job=job)), argv)[0].model_spec.name == "qwen3"
    )


@pytest.mark.parametrize(
    "body, argv, expected",
    [
        ("[training]\nstepz = 3\n", (), "training.stepz = 3: unknown key 'training.stepz'; did you mean 'training.steps'?"),
        ("[trainin]\nsteps = 3\n", (), "did you mean 'training'?"),
        ('[training]\nsteps = "abc"\n', (), "training.steps = 'abc': Error parsing --training.steps"),
        ('[training]\ndtype = "float64"\n', (), "training.dtype = 'float64': invalid choice"),
        ("[compile]\nenable = 1\n", (), "compile.enable = 1: expected true or false"),
        ("[compile]\ncomponents = []\n", (), "no command-line value means []"),
        ('[activation_checkpoint]\nmode = "ful"\n', (), "unknown mode; one of selective, full, memory-budget, none"),
        ('[activation_checkpoint]\nmode = "none"\ndebug = true\n', (), "is off (mode 'none')"),
        ('[[optimizer.param_groups]]\n[[optimizer.param_groups]]\npattern = "x"\n', (), "'optimizer.param_groups.1' is not in the base config"),
        ("[checkpoint]\nkeep_latest_k = 1\n", (), "Error parsing checkpoint: We need to maintain at least 2"),
        ("[training]\nsteps = 3\n", ("--training.stepz", "3"), "command line: --training.stepz 3: unknown key"),
        ("", ("--training.steps", "x"), "command line: --training.steps x: Error parsing --training.steps"),
        ("", ("--compile.enable", "true"), "a flag takes no value: --compile.enable or --compile.no_enable"),
        ("", ("--training.steps",), "Missing value for argument '--training.steps'"),
    ],
)  # fmt: skip
def test_bad_entries_name_source_key_and_value(tmp_path, body, argv, expected):
    path = write(tmp_path, body)
    msg = error_of(path, argv)
    assert msg.startswith("command line:" if argv else f"{path}:") and expected in msg


@pytest.mark.parametrize(
    "job, expected",
    [
        (JOB + 'confg = "x"\n', "job.confg = 'x': unknown key 'job.confg'; did you mean 'config'?"),
        ('[job]\nmodule = "tests.train.qwen3_debug_config"\n', "job.config: missing"),
        (JOB.replace("qwen3_tiny", "nope"), "Config function 'nope' not found"),
        (JOB.replace("tests.train.qwen3_debug_config", "no_such_mod"), "Cannot import module 'no_such_mod'"),
        (JOB + "debug_assets = 1\n", "job.debug_assets = 1: expected true or false"),
        ("[job\n", "invalid TOML"),
    ],
)  # fmt: skip
def test_bad_job_tables(tmp_path, job, expected):
    path = write(tmp_path, "", job=job)
    assert str(path) in error_of(path) and expected in error_of(path)


def test_config_time_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(
        tmp_path, '[dataloader]\ndataset = "wiki"\n', job=JOB + "debug_assets = true\n"
    )
    msg = error_of(path, check=True)
    assert f"{path}: dataloader.dataset = 'wiki': unknown dataset" in msg
    assert "c4, c4_test, c4_validation" in msg
    top = 'hf_assets_path = "./assets/hf/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"\n'
    msg = error_of(write(tmp_path, "", top=top), check=True)
    assert (
        "hf_assets_path" in msg
        and "no tokenizer (tokenizer.json or tokenizer_config.json)" in msg
    )
    assert (
        "python scripts/download_hf_assets.py --repo_id nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"
        " --local_dir ./assets/hf --assets tokenizer config"
    ) in msg


def entry_point(*args, cwd=REPO_ROOT):
    return subprocess.run(
        [sys.executable, "-m", "torchtitan_nemotron3.train", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


@pytest.mark.integration
def test_print_config_exits_0():
    proc = entry_point(
        "--config_file", "train_configs/debug_model.toml", "--print_config"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads(proc.stdout)
    assert (
        config["model_spec"]["name"] == "nemotron3"
        and config["training"]["steps"] == 20
    )
    assert config["dump_folder"] == str(REPO_ROOT / "outputs" / "debug")


@pytest.mark.integration
def test_help_lists_fields():
    proc = entry_point("--config_file", "tests/train/qwen3_tiny.toml", "--help")
    assert proc.returncode == 0 and "--config_file" in proc.stdout
    assert (
        "--training.steps INT" in proc.stdout
        and "activation-checkpoint:full" in proc.stdout
    )


@pytest.mark.integration
@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config_file", "nope.toml"], "nope.toml: job file not found"),
        (["[training]\nstepz = 3\n"], "training.stepz = 3: unknown key 'training.stepz'; did you mean"),
        (["--training.steps", "x"], "command line: --training.steps x: Error parsing"),
        (["--parallelism.tensor_parallel_degree", "4"], "command line: parallelism.tensor_parallel_degree=4 must divide num_key_value_heads=2"),
        (["--parallelism.context_parallel_degree", "3"], "training.seq_len=256 must be divisible by 6"),
        (["--hf_assets_path", "/nowhere/Model"], "download_hf_assets.py --repo_id <org>/Model --local_dir"),
    ],
)  # fmt: skip
def test_bad_job_is_one_line_and_exit_2(tmp_path, args, expected):
    if not args[0].startswith("--"):  # a job file with this body
        path = tmp_path / "job.toml"
        path.write_text('[job]\nconfig = "nemotron3_debugmodel"\n' + args[0])
        args, expected = ["--config_file", str(path)], f"{path}: {expected}"
    elif args[0] != "--config_file":
        args = ["--config_file", "train_configs/debug_model.toml", *args]
    proc = entry_point(*args)
    log = proc.stdout + proc.stderr  # TorchTitan logs to stdout
    errors = [ln for ln in log.splitlines() if " ERROR " in ln]
    assert proc.returncode == 2, log[-3000:]
    assert len(errors) == 1 and expected in errors[0], log[-3000:]
    assert "Traceback" not in log and "step:" not in log
    assert "Building" not in log  # no trainer component was built


@pytest.mark.integration
def test_run_train_checks_the_job_before_torchrun(tmp_path):
    """run_train.sh's check: a bad key is one line on stderr and exit 2, and no
    rank is started."""
    env = {**os.environ, "CONFIG_FILE": "train_configs/debug_model.toml", "NGPU": "2"}
    env.pop("CHECK_JOB", None)
    proc = subprocess.run(
        [str(REPO_ROOT / "run_train.sh"), "--training.stepz", "3"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "unknown key 'training.stepz'; did you mean 'training.steps'?" in proc.stderr
    assert "torchrun" not in proc.stdout + proc.stderr
