"""TOML job files, written out as TorchTitan's own command line.

TorchTitan 0.3.0 has no TOML: a job is ``--module M --config fn`` (a function returning
``Trainer.Config``) plus ``--section.field value`` flags, parsed by tyro in
``ConfigManager.parse_args``. A job file is another way to write those flags::

    dump_folder = "out"               --dump_folder $PWD/out   (PATH_KEYS: made absolute)
    [job]                             --module torchtitan_nemotron3   (module = "...")
    config = "nemotron3_debugmodel"   --config nemotron3_debugmodel
    [compile]
    enable = false                    --compile.no_enable      (true: --compile.enable)
    components = ["model", "loss"]    --compile.components model,loss
    [activation_checkpoint]
    mode = "full"                     activation-checkpoint:full   (a tyro subcommand)
    [[optimizer.param_groups]]        --optimizer.param_groups.0.<key> ...

``"None"`` is tyro's None. The command line's flags follow the file's, so they win.
``[job] debug_assets = true`` adds flags for the generated offline tokenizer and corpus
(the pre-tokenized debug corpus for the pretraining loader, the text one for
TorchTitan's HF text loader).

Why translate: one parser (TorchTitan's), so files, flags and ``torchrun -m
torchtitan.train`` accept the same fields the same way. This layer adds what tyro
lacks: a key check against the base config's fields ("did you mean"), tyro's errors
(printed, then SystemExit) traced back to the file and key, a union's subcommand put
after the other flags as tyro requires, and relative paths made absolute against the
working directory. Tables, dicts and ``[[arrays]]`` flatten to dotted keys: they set
entries the base config already has, and an empty list cannot be written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import io
import os
import re
import sys
import tomllib
import typing
from typing import Any

import tyro
from torchtitan.config import ConfigManager
from torchtitan.tools.filesystem import is_remote
from torchtitan.trainer import Trainer

CLI = "command line"
DEFAULT_MODULE = "torchtitan_nemotron3"
JOB_KEYS = {"config": str, "module": str, "debug_assets": bool, "description": str}
PATH_KEYS = {
    "dump_folder",
    "hf_assets_path",
    "checkpoint.initial_load_path",
    "dataloader.dataset_path",
    "validator.dataloader.dataset_path",
    "parallelism.pipeline_parallel_schedule_csv",
}
_SUBCOMMAND = type(tyro.conf.subcommand("probe"))


class ConfigError(ValueError):
    """A bad job file or flag; the message is one line naming source, key and value."""


@dataclasses.dataclass
class _Entry:
    source: str  # the job file, or CLI
    key: str  # dotted field path, "training.steps"
    value: Any  # a TOML value, or the tokens after a command-line flag

    def __str__(self) -> str:
        if self.source == CLI:
            return " ".join([f"--{self.key}", *self.value])
        return f"{self.key} = {self.value!r}"

    def error(self, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self}: {problem}")


def _fields(cls) -> dict[str, Any]:
    """Settable fields of a config class (``Suppress``-ed ones are set in code)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(cls)
        if f.init and tyro.conf.Suppress not in getattr(hints[f.name], "__metadata__", ())
    }  # fmt: skip


def _variants(hint) -> dict[str, type]:
    """``{subcommand: class}`` of a union field such as activation_checkpoint."""
    return {
        meta.name: typing.get_args(member)[0]
        for member in typing.get_args(hint)
        for meta in getattr(member, "__metadata__", ())
        if isinstance(meta, _SUBCOMMAND) and meta.name
    }


def _variant_of(hint, value) -> str:
    return next(n for n, cls in _variants(hint).items() if cls is type(value))


def _did_you_mean(word: str, known, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f"; did you mean '{prefix}{close[0]}'?" if close else "; see --help"


def _negated(key: str) -> str:
    head, _, name = key.rpartition(".")
    return f"{head}.no_{name}" if head else f"no_{name}"


def _resolve(base, e: _Entry, modes: dict[str, str]):
    """``(hint, union, is_mode)``: the type hint of ``e.key`` on ``base`` (the union's
    for a ``<union>.mode`` key) and the union field it lies in, if any."""
    node, hint, union, parts = base, None, None, e.key.split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if dataclasses.is_dataclass(node):
            fields = _fields(type(node))
            if e.source == CLI and part[:3] == "no_" and fields.get(part[3:]) is bool:
                part = part[3:]  # tyro's --section.no_flag
            if part not in fields:
                known = _did_you_mean(part, fields, here[: -len(part)])
                raise e.error(f"unknown key '{here}'{known}")
            hint, node = fields[part], getattr(node, part)
        elif isinstance(node, (dict, list)):
            seq = isinstance(node, list)
            keys = list(map(str, range(len(node)))) if seq else list(node)
            if part not in keys:
                has = ", ".join(keys) or "none"
                raise e.error(
                    f"'{here}' is not in the base config (it has {has}); flags set "
                    "existing entries only: add it in the config function"
                )
            hint, node = Any, node[int(part) if seq else part]
        else:
            raise e.error(f"'{here.rpartition('.')[0]}' is a value, not a table")
        if _variants(hint) and i + 1 < len(parts):
            union = here
            if parts[i + 1 :] == ["mode"]:
                return hint, union, True
            cls = _variants(hint)[modes.get(here) or _variant_of(hint, node)]
            if cls is type(None):
                raise e.error(f"'{here}' is off (mode 'none'); set {here}.mode first")
            node = node if type(node) is cls else cls()
    if dataclasses.is_dataclass(node) or _variants(hint):
        raise e.error(f"'{e.key}' is a table: set its fields (and a union's mode)")
    return hint, union, False


def _tokens(value, e: _Entry) -> list[str]:
    if isinstance(value, list):
        if not value:
            raise e.error(
                "no command-line value means []: set it in the config function"
            )
        if all(isinstance(v, str) for v in value):  # TorchTitan's list[str]: a,b,c
            return [",".join(value)]
        return [t for v in value for t in _tokens(v, e)]
    return [str(value)]


def _absolute(path):
    if not isinstance(path, str) or path in ("", "None") or is_remote(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def _render(base, entries: list[_Entry]) -> tuple[list[str], dict[str, _Entry]]:
    """tyro's arguments for ``entries``, and the entry behind each flag."""
    args, unions, modes, blame = [], {}, {}, {}
    for e in entries:
        hint, union, is_mode = _resolve(base, e, modes)
        value = e.value
        if is_mode:  # the subcommand; the variant's flags given before it are dropped
            name = " ".join(value) if e.source == CLI else value
            if name not in _variants(hint):
                raise e.error(f"unknown mode; one of {', '.join(_variants(hint))}")
            modes[union], unions[union] = name, []
            continue
        if e.key in PATH_KEYS:
            value = list(map(_absolute, value)) if e.source == CLI else _absolute(value)
        flag, tokens = e.key, value
        if e.source == CLI and hint is bool and value:
            raise e.error(f"a flag takes no value: --{e.key} or --{_negated(e.key)}")
        if e.source != CLI and hint is bool:
            if not isinstance(value, bool):
                raise e.error("expected true or false")
            flag, tokens = (e.key if value else _negated(e.key)), []
        elif e.source != CLI:
            tokens = _tokens(value, e)
        blame[flag] = blame[e.key] = e
        (unions.setdefault(union, []) if union else args).extend([f"--{flag}", *tokens])
    for union, flags in unions.items():  # tyro: a subcommand follows the other flags
        hint = _fields(type(base))[union]
        name = modes.get(union) or _variant_of(hint, getattr(base, union))
        args += [f"{union.replace('_', '-')}:{name}", *flags]
    return args, blame


def _tyro_error(text: str, blame: dict[str, _Entry], entries: list[_Entry]) -> str:
    """tyro's error box as one line, prefixed with the entry that caused it."""
    lines = [s.strip(" │|") for s in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()]
    rules = [i for i, s in enumerate(lines) if s and set(s) <= {"-", "─"}]
    body = lines[rules[0] + 1 : rules[1]] if len(rules) > 1 else lines
    msg = " ".join(" ".join(body).split()) or "invalid arguments"
    # "Error parsing --flag: ...", "Error parsing <section>: ..." (a __post_init__)
    found = re.findall(r"(?:--|Error parsing )([\w.-]+)", msg)
    flags = [f.lstrip("-").replace("-", "_") for f in found]
    culprits = [blame[f] for f in flags if f in blame] + [
        e for e in reversed(entries) for f in flags[:1] if e.key.startswith(f + ".")
    ]
    if not culprits:
        return f"{entries[-1].source if entries else CLI}: {msg}"
    return f"{culprits[0].source}: {culprits[0]}: {msg}"


def _flatten(table: dict, prefix: str = ""):
    for key, value in table.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for i, item in enumerate(value):
                yield from _flatten(item, f"{prefix}{key}.{i}.")
        else:
            yield f"{prefix}{key}", value


def _read_job(path: str) -> tuple[dict, list[_Entry]]:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: job file not found")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    job = data.pop("job", {})
    for key, value in job.items():
        e = _Entry(path, f"job.{key}", value)
        if key not in JOB_KEYS:
            raise e.error(f"unknown key 'job.{key}'{_did_you_mean(key, JOB_KEYS)}")
        if not isinstance(value, JOB_KEYS[key]):
            raise e.error(
                "expected true or false" if key == "debug_assets" else "not a string"
            )
    return job, [_Entry(path, k, v) for k, v in _flatten(data)]


def _read_cli(argv: list[str]) -> list[_Entry]:
    """``--a.b x y``, ``--a.b=x``, bare flags and tyro's ``<union>:<mode>`` tokens."""
    unions = {n for n, hint in _fields(Trainer.Config).items() if _variants(hint)}
    entries: list[_Entry] = []
    for token in argv:
        union, colon, mode = token.partition(":")
        if token.startswith("--"):
            key, eq, value = token[2:].partition("=")
            entries.append(_Entry(CLI, key.replace("-", "_"), [value] if eq else []))
        elif colon and union.replace("-", "_") in unions:
            entries.append(_Entry(CLI, f"{union.replace('-', '_')}.mode", [mode]))
        elif entries:
            entries[-1].value.append(token)
        else:
            raise ConfigError(f"{CLI}: {token!r}: expected --section.field VALUE")
    return entries


def _load_base(module: str, fn: str, source: str) -> Trainer.Config:
    try:
        return ConfigManager()._load_config(["--module", module, "--config", fn])[0]
    except (ImportError, ValueError) as e:
        if isinstance(e, ValueError) and not str(e).startswith("Config function"):
            raise
        for name in (f"{module}.config_registry", module):  # a broken import: show it
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as missing:
                if not (missing.name and name.startswith(missing.name)):
                    raise
        raise ConfigError(
            f"{source}: job.module = {module!r}, job.config = {fn!r}: {e}"
        ) from None


def load_job(config_file: str | None, argv: list[str]):
    """``(Trainer.Config, source_of)`` for a job file (or none) plus command-line flags.

    ``source_of(key)`` names where a field's value came from. ``--help`` in ``argv``
    prints tyro's help for the job's config and exits 0.
    """
    job, entries = _read_job(config_file) if config_file else ({}, [])
    job_source = config_file or CLI
    for e in _read_cli([a for a in argv if a not in ("-h", "--help")]):
        name = e.key.removeprefix("job.")
        if name in JOB_KEYS and (e.key != name or name in ("config", "module")):
            job[name], job_source = (e.value[0] if e.value else True), CLI
        else:
            entries.append(e)
    module, fn = job.get("module", DEFAULT_MODULE), job.get("config")
    if fn is None:
        raise ConfigError(f"{job_source}: job.config: missing (a function in {module})")
    head = ["--module", module, "--config", fn]
    if {"-h", "--help"} & set(argv):
        ConfigManager().parse_args([*head, "--help"])  # tyro prints, then SystemExit(0)
    base = _load_base(module, fn, job_source)
    if job.get("debug_assets") in (True, "True", "true"):
        from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader

        from torchtitan_nemotron3.data.pretrain import PretrainDataLoader
        from torchtitan_nemotron3.train.assets import (
            ensure_debug_assets,
            ensure_debug_pretokenized,
        )

        if isinstance(base.dataloader, PretrainDataLoader.Config):
            paths = zip(("hf_assets_path", "dataloader.blend"), ensure_debug_pretokenized())
            entries[:0] = [_Entry(job_source, key, path) for key, path in paths]
        elif isinstance(base.dataloader, HuggingFaceTextDataLoader.Config):
            paths = zip(
                ("hf_assets_path", "dataloader.dataset_path"), ensure_debug_assets()
            )
            entries[:0] = [_Entry(job_source, key, path) for key, path in paths]
            entries.insert(0, _Entry(job_source, "dataloader.dataset", "c4_test"))
        else:
            raise ConfigError(
                f"{job_source}: job.debug_assets = true: {module}:{fn}() needs a "
                "PretrainDataLoader or HuggingFaceTextDataLoader (or sets its own "
                "data, e.g. use_debug_pretraining_data(config))"
            )
    args, blame = _render(base, entries)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            config = ConfigManager().parse_args([*head, *args])
    except SystemExit:
        raise ConfigError(_tyro_error(captured.getvalue(), blame, entries)) from None
    sys.stderr.write(captured.getvalue())

    def source_of(key: str) -> str:
        hits = [e.source for e in entries if f"{e.key}.".startswith(f"{key}.")]
        return hits[-1] if hits else f"{module}:{fn}()"

    return config, source_of
