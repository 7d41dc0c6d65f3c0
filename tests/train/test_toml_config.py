"""TOML job files and --section.field overrides -> Trainer.Config.

The base config is the test-only ``qwen3_tiny`` (no NemotronH dependency); no
training happens here, only config construction.
"""

import textwrap

import pytest
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

from torchtitan_nemotron3.train.toml_config import (
    ConfigError,
    load_toml_config,
    parse_overrides,
)

JOB = """\
[job]
module = "tests.train.qwen3_debug_config"
config = "qwen3_tiny"
"""


def write(tmp_path, body: str, name: str = "job.toml", job: str = JOB):
    path = tmp_path / name
    path.write_text(job + textwrap.dedent(body))
    return path


# ----------------------------------------------------------------- applied values


def test_toml_values_override_base(tmp_path):
    path = write(
        tmp_path,
        """
        [training]
        steps = 20
        max_norm = 2
        dtype = "bfloat16"

        [parallelism]
        data_parallel_shard_degree = -1
        spmd_backend = "partial_dtensor"

        [checkpoint]
        initial_load_path = "/abs/ckpt"

        [compile]
        components = ["model"]

        [lr_scheduler]
        decay_ratio = "None"

        [[optimizer.param_groups]]
        pattern = ".*"
        optimizer_name = "AdamW"
        optimizer_kwargs = { lr = 1e-3 }
        """,
        job="dump_folder = '/tmp/somewhere'\n" + JOB,
    )
    config = load_toml_config(path)
    assert config.dump_folder == "/tmp/somewhere"
    assert config.training.steps == 20
    assert config.training.max_norm == 2 and isinstance(config.training.max_norm, int)
    assert config.training.dtype == "bfloat16"
    assert config.training.seq_len == 128  # untouched: base config value
    assert config.parallelism.data_parallel_shard_degree == -1
    assert config.parallelism.spmd_backend == "partial_dtensor"
    assert config.checkpoint.initial_load_path == "/abs/ckpt"
    assert config.compile.components == ["model"]
    assert config.lr_scheduler.decay_ratio is None
    (group,) = config.optimizer.param_groups
    assert (group.pattern, group.optimizer_name) == (".*", "AdamW")
    assert group.optimizer_kwargs == {"lr": 1e-3}


def test_union_section_mode_selects_variant(tmp_path):
    path = write(tmp_path, '[activation_checkpoint]\nmode = "full"\ndebug = true\n')
    config = load_toml_config(path)
    assert type(config.activation_checkpoint) is FullAC.Config
    assert config.activation_checkpoint.debug is True

    config = load_toml_config(path, ["--activation_checkpoint.mode", "none"])
    assert config.activation_checkpoint is None

    # Same variant as the base: fields are set in place, others keep base values.
    path = write(tmp_path, "[activation_checkpoint]\ndebug = true\n", name="b.toml")
    config = load_toml_config(path)
    assert type(config.activation_checkpoint) is SelectiveAC.Config
    assert config.activation_checkpoint.debug is True


def test_overrides_applied_on_top_of_file(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 20\n")
    config = load_toml_config(
        path,
        [
            "--training.steps", "5",
            "--training.seq_len=64",
            "--training.max_norm", "0.5",
            "--training.dtype", "bfloat16",
            "--parallelism.data_parallel_shard_degree", "-1",
            "--compile.enable",
            "--compile.components", "model,loss",
            "--metrics.no-enable_tensorboard",
            "--debug.seed", "7",
            "--checkpoint.initial_load_path", "None",
            "--activation_checkpoint.preserve_rng_state", "false",
            "--dump_folder", "/tmp/x",
        ],
    )  # fmt: skip
    assert config.training.steps == 5
    assert config.training.seq_len == 64
    assert config.training.max_norm == 0.5
    assert config.training.dtype == "bfloat16"
    assert config.parallelism.data_parallel_shard_degree == -1
    assert config.compile.enable is True
    assert config.compile.components == ["model", "loss"]
    assert config.metrics.enable_tensorboard is False
    assert config.debug.seed == 7
    assert config.checkpoint.initial_load_path is None
    assert config.activation_checkpoint.preserve_rng_state is False
    assert config.dump_folder == "/tmp/x"


def test_job_overrides_select_base(tmp_path):
    path = write(tmp_path, "", job='[job]\nconfig = "does_not_exist"\n')
    config = load_toml_config(
        path,
        [
            "--job.module",
            "tests.train.qwen3_debug_config",
            "--job.config",
            "qwen3_tiny",
        ],
    )
    assert config.model_spec.name == "qwen3"


def test_debug_assets_wire_tokenizer_and_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHTITAN_NEMOTRON3_ASSETS", str(tmp_path / "assets"))
    path = write(tmp_path, "", job=JOB + "debug_assets = true\n")
    config = load_toml_config(path)
    assert config.hf_assets_path.startswith(str(tmp_path / "assets"))
    assert (tmp_path / "assets").exists()
    assert config.dataloader.dataset == "c4_test"
    assert config.dataloader.dataset_path.startswith(str(tmp_path / "assets"))


def test_parse_overrides_shapes():
    nested = parse_overrides(["--a.b", "1", "--a.c=x", "--d", "--e.f", "-3"])
    assert nested["a"]["b"] == "1" and nested["a"]["c"] == "x"
    assert nested["e"]["f"] == "-3"
    assert repr(nested["d"]) == "<flag>"


# ------------------------------------------------------------------------ errors


def error_of(path, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_toml_config(path, overrides)
    return str(info.value)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(FileNotFoundError, match="TOML config file not found") as info:
        load_toml_config(missing)
    assert str(missing) in str(info.value)


def test_invalid_toml_names_file(tmp_path):
    path = write(tmp_path, "[training\nsteps = 1\n")
    msg = error_of(path)
    assert str(path) in msg and "invalid TOML" in msg


def test_unknown_section(tmp_path):
    path = write(tmp_path, "[trainin]\nsteps = 3\n")
    msg = error_of(path)
    assert str(path) in msg
    assert "unknown section [trainin]" in msg
    assert "Did you mean 'training'" in msg


def test_unknown_key(tmp_path):
    path = write(tmp_path, "[training]\nstepz = 3\n")
    msg = error_of(path)
    assert str(path) in msg
    assert "training.stepz" in msg and "unknown key 'stepz'" in msg
    assert "Did you mean 'steps'" in msg


def test_unknown_nested_key_on_runtime_subclass(tmp_path):
    # validator.dataloader is a HuggingFaceTextDataLoader.Config at runtime.
    path = write(tmp_path, '[validator.dataloader]\ndatasett = "x"\n')
    msg = error_of(path)
    assert "validator.dataloader.datasett" in msg
    assert "HuggingFaceTextDataLoader.Config" in msg


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, "", job="dump_foldr = 'x'\n" + JOB)
    msg = error_of(path)
    assert str(path) in msg and "dump_foldr" in msg and "dump_folder" in msg


def test_wrong_type(tmp_path):
    path = write(tmp_path, '[training]\nsteps = "abc"\n')
    msg = error_of(path)
    assert str(path) in msg
    assert "training.steps" in msg and "expected int" in msg and "'abc'" in msg


@pytest.mark.parametrize(
    "body, expected",
    [
        ('[training]\ndtype = "float64"\n', "expected one of 'bfloat16', 'float32'"),
        ("[training]\nsteps = 1.5\n", "expected int, got 1.5 (float)"),
        ("[training]\nsteps = true\n", "expected int, got True (bool)"),
        ('[compile]\ncomponents = ["model", 3]\n', "expected list[str]"),
        ('[activation_checkpoint]\nmode = "partial"\n', "activation_checkpoint.mode"),
        ("training = 3\n", "is a section, not a value"),
    ],
)
def test_wrong_type_variants(tmp_path, body, expected):
    job = JOB
    if not body.startswith("["):  # a top-level key must precede [job]
        body, job = "", body + JOB
    path = write(tmp_path, body, job=job)
    msg = error_of(path)
    assert str(path) in msg and expected in msg


def test_mode_none_rejects_other_keys(tmp_path):
    path = write(tmp_path, '[activation_checkpoint]\nmode = "none"\ndebug = true\n')
    assert "takes no other keys" in error_of(path)


def test_code_only_fields_rejected(tmp_path):
    path = write(tmp_path, '[model_spec]\nname = "x"\n')
    assert "model_spec" in error_of(path) and "base config function" in error_of(path)


def test_post_init_validation_runs(tmp_path):
    path = write(tmp_path, '[checkpoint]\ninitial_load_path = "relative/ckpt"\n')
    msg = error_of(path)
    assert str(path) in msg and "absolute" in msg


@pytest.mark.parametrize(
    "job, expected",
    [
        ('[job]\nconfg = "x"\n', "unknown key 'confg' in [job]"),
        ('[job]\nmodule = "tests.train.qwen3_debug_config"\n', "missing [job] config"),
        (JOB.replace("qwen3_tiny", "nope"), "'nope' is not a function"),
        (
            JOB.replace("tests.train.qwen3_debug_config", "no_such_mod"),
            "cannot be imported",
        ),
        (JOB + "debug_assets = 1\n", "job.debug_assets: expected bool"),
    ],
)
def test_job_errors(tmp_path, job, expected):
    path = write(tmp_path, "", job=job)
    msg = error_of(path)
    assert str(path) in msg and expected in msg


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["--training.steps", "abc"], "--training.steps: expected int, got 'abc'"),
        (["--training.stepz", "3"], "--training.stepz: unknown key 'stepz'"),
        (["--trainin.steps", "3"], "unknown section [trainin]"),
        (["--training.steps"], "expected int, got no value"),
        (["--training.dtype", "float64"], "expected one of 'bfloat16', 'float32'"),
        (["steps"], "expected an override like --section.field VALUE"),
        (["--job.config", "nope"], "'nope' is not a function"),
    ],
)
def test_override_errors_name_key(tmp_path, overrides, expected):
    path = write(tmp_path, "")
    msg = error_of(path, overrides)
    assert msg.startswith("command line:") and expected in msg


# ------------------------------------------------------------- TorchTitan types


def _as_table(node):
    """Every settable field of a config tree as a TOML-like table (None -> "None")."""
    import dataclasses

    from torchtitan_nemotron3.train import toml_config as tc

    def value(v):
        if v is None:
            return "None"
        if dataclasses.is_dataclass(v):
            return {f.name: value(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [value(x) for x in v]
        if isinstance(v, dict):
            return {k: value(x) for k, x in v.items()}
        return v

    table = {}
    for name, hint in tc._settable_fields(type(node)).items():
        if tc._is_suppressed(hint):
            continue
        current = getattr(node, name)
        if dataclasses.is_dataclass(current) and tc._is_section(node, name, hint):
            table[name] = _as_table(current)
            variants = tc._variants(hint)
            if variants:
                table[name]["mode"] = next(
                    k for k, cls in variants.items() if cls is type(current)
                )
        else:
            table[name] = value(current)
    return table


@pytest.mark.parametrize(
    "module, fn",
    [
        ("tests.train.qwen3_debug_config", "qwen3_tiny"),
        ("torchtitan_nemotron3.config_registry", "nemotron3_debugmodel"),
        ("torchtitan_nemotron3.config_registry", "nemotron3_nano_30b"),
    ],
)
def test_every_field_round_trips(module, fn):
    """Setting each field of a full Trainer.Config to its own value is accepted and
    changes nothing: the type checker understands all of TorchTitan's annotations."""
    import importlib
    import importlib.util

    from torchtitan_nemotron3.train import toml_config as tc

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet")
    base = getattr(importlib.import_module(module), fn)

    def normalized(d):  # TOML has no tuples
        if isinstance(d, dict):
            return {k: normalized(v) for k, v in d.items()}
        if isinstance(d, (list, tuple)):
            return [normalized(v) for v in d]
        return d

    config = base()
    before = normalized(config.to_dict())
    touched = []
    tc._apply_table(config, _as_table(config), "", "round trip", touched)
    tc._validate(touched, config, "round trip")
    assert normalized(config.to_dict()) == before
