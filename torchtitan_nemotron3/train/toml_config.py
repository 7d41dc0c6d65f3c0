"""TOML job files for TorchTitan 0.3.0, which only knows config functions + CLI flags.

TorchTitan 0.3.0 dropped TOML: a job is ``--module M --config fn`` (a function
returning ``Trainer.Config``) plus ``--section.field`` flags. A TOML file here is a
thin, checked layer on top of exactly that model:

.. code-block:: toml

    # Top-level keys set top-level Trainer.Config fields.
    dump_folder = "./outputs/debug"

    [job]                      # reserved: how to build the base config
    config = "nemotron3_debugmodel"       # function in `module` -> Trainer.Config
    module = "torchtitan_nemotron3.config_registry"   # optional, this is the default
    debug_assets = true        # optional: use the generated offline tokenizer + corpus
    description = "free text"  # optional, ignored

    [training]                 # every other table is a Trainer.Config field
    steps = 20
    seq_len = 256

    [parallelism]
    data_parallel_shard_degree = -1

    [activation_checkpoint]    # union-typed field: `mode` picks the variant
    mode = "full"              # "selective" | "full" | "memory-budget" | "none"

    [checkpoint]
    initial_load_path = "/abs/path"

Semantics:

* The base config is the function ``[job] config`` of module ``[job] module``;
  every TOML value then overrides the field at the same dotted path of the
  returned ``Trainer.Config``. Unset fields keep the base function's values.
* Tables descend into the *runtime* config object, so subclass configs work
  (e.g. ``[dataloader] dataset_path`` on a ``HuggingFaceTextDataLoader.Config``).
* Fields typed as a union of tyro subcommands (``activation_checkpoint``) take a
  ``mode`` key naming the variant (the same names as TorchTitan's tyro CLI); the
  variant is rebuilt with defaults only when the mode changes.
* TOML has no null: the string ``"None"`` sets an optional field to ``None``
  (as tyro does on the command line).
* Arrays of tables (``[[optimizer.param_groups]]``) build lists of dataclasses.
* Paths are used as written (relative ones resolve against the working directory,
  as with TorchTitan's CLI).

Command-line overrides ``--section.field value`` (also ``--section.field=value``,
a bare ``--section.field`` for ``true``, ``--section.no-field`` for ``false``) are
applied after the file, through the same code and checks; values are parsed by
the field's type (``int``, ``float``, ``bool``, ``Literal``, ``list[str]`` as
``a,b,c`` or a TOML array, ``dict`` as a TOML inline table). ``--job.config`` and
``--job.module`` override the base config too.

Errors (:class:`ConfigError`) name the source (file path or "command line"),
the dotted key, and for type errors the expected type and the value received.

Why not tyro (TorchTitan's own CLI machinery): it reports errors by printing and
raising ``SystemExit``, cannot name the TOML file a bad value came from, and
selects union variants with positional subcommands. The parsing rules above
follow tyro's where they overlap (``None``, comma lists, bool flags).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import tomllib
import types
import typing
from typing import Any

import tyro
from torchtitan.trainer import Trainer

JOB_SECTION = "job"
DEFAULT_CONFIG_MODULE = "torchtitan_nemotron3.config_registry"
MODE_KEY = "mode"
CLI_SOURCE = "command line"

_JOB_KEYS = {
    "config": str,
    "module": str,
    "debug_assets": bool,
    "description": str,
}


# tyro markers in TorchTitan's config annotations: ``Suppress`` (set in code only,
# e.g. ``model_spec``) and ``subcommand(name)`` (union variants).
_SUPPRESS = tyro.conf.Suppress
_SUBCOMMAND_TYPE = type(tyro.conf.subcommand("probe"))


class ConfigError(ValueError):
    """A config file or override is invalid; the message names source and key."""


# ----------------------------------------------------------------------- typing


class _CliValue(str):
    """A raw command-line string: parsed by the target field's type, not as TOML."""


class _Flag:
    """A bare ``--section.field`` (True) or ``--section.no-field`` (False)."""

    def __init__(self, value: bool) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<flag>" if self.value else "<no- flag>"


class _Mismatch(Exception):
    pass


def _strip_annotated(tp):
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _is_suppressed(tp) -> bool:
    """tyro.conf.Suppress marks fields TorchTitan sets in code only (model_spec)."""
    if typing.get_origin(tp) is not typing.Annotated:
        return False
    return any(m is _SUPPRESS for m in tp.__metadata__)


def _union_members(tp) -> tuple | None:
    tp = _strip_annotated(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _variants(tp) -> dict[str, type | None]:
    """``{subcommand name: config class or None}`` for tyro subcommand unions."""
    out: dict[str, type | None] = {}
    for member in _union_members(tp) or ():
        if typing.get_origin(member) is not typing.Annotated:
            continue
        for meta in member.__metadata__:
            name = getattr(meta, "name", None)
            if isinstance(meta, _SUBCOMMAND_TYPE) and name:
                cls = typing.get_args(member)[0]
                out[name] = None if cls is type(None) else cls
    return out


def _dataclass_types(tp) -> list[type]:
    tp = _strip_annotated(tp)
    members = _union_members(tp) or (tp,)
    return [
        _strip_annotated(m)
        for m in members
        if isinstance(_strip_annotated(m), type)
        and dataclasses.is_dataclass(_strip_annotated(m))
    ]


def _type_name(tp) -> str:
    tp = _strip_annotated(tp)
    if tp is Any:
        return "any"
    if tp is type(None):
        return "None"
    members = _union_members(tp)
    if members is not None:
        return " | ".join(_type_name(m) for m in members)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(
            "..." if a is Ellipsis else _type_name(a) for a in typing.get_args(tp)
        )
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if isinstance(tp, type):
        return tp.__qualname__ if dataclasses.is_dataclass(tp) else tp.__name__
    return str(tp)


def _admits(tp, target) -> bool:
    tp = _strip_annotated(tp)
    members = _union_members(tp)
    if members is not None:
        return any(_admits(m, target) for m in members)
    return tp is target


def _coerce(value, tp, where: str, source: str):
    """Check ``value`` (from TOML, or a raw ``_CliValue``) against ``tp``."""
    if isinstance(value, (_CliValue, _Flag)):
        return _coerce_cli(value, tp, where, source)
    return _coerce_toml(value, tp, where, source)


def _coerce_toml(value, tp, where: str, source: str):
    tp = _strip_annotated(tp)
    if tp is Any or tp is object:
        return value
    if tp is type(None):
        if value is None or value == "None":
            return None
        raise _Mismatch
    members = _union_members(tp)
    if members is not None:
        if value == "None" and type(None) in members:
            return None
        # Try the member matching the value's own type first, so `1` stays an int
        # for `float | int` and a string stays a string for `str | None`.
        ordered = sorted(members, key=lambda m: _strip_annotated(m) is not type(value))
        for member in ordered:
            try:
                return _coerce_toml(value, member, where, source)
            except _Mismatch:
                continue
        raise _Mismatch
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        for choice in args:
            if type(choice) is type(value) and choice == value:
                return value
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin in (list, tuple, set, frozenset):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise _Mismatch
            items = [
                _coerce_toml(v, a, where, source)
                for v, a in zip(value, args, strict=True)
            ]
        else:
            item_tp = args[0] if args else Any
            items = [
                _coerce_toml(v, item_tp, f"{where}[{i}]", source)
                for i, v in enumerate(value)
            ]
        return origin(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        val_tp = args[1] if len(args) == 2 else Any
        return {
            k: _coerce_toml(v, val_tp, f"{where}.{k}", source) for k, v in value.items()
        }
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch
        return _new_node(tp, value, where, source)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _Mismatch


def _coerce_cli(value, tp, where: str, source: str):
    """Parse a command-line string by the field type (tyro-compatible rules)."""
    if isinstance(value, _Flag):
        if _admits(tp, bool):
            return value.value
        raise _Mismatch
    raw = str(value)
    if raw == "None" and _admits(tp, type(None)):
        return None
    if _admits(tp, str):
        return raw
    candidates: list[Any] = []
    try:
        candidates.append(tomllib.loads(f"v = {raw}")["v"])
    except tomllib.TOMLDecodeError:
        pass
    for parse in (int, float):
        try:
            candidates.append(parse(raw))
        except ValueError:
            pass
    if raw in ("True", "False"):
        candidates.append(raw == "True")
    candidates.append(raw)  # Literal strings, e.g. `--training.dtype bfloat16`
    candidates.append(raw.split(","))  # lists: `--compile.components model,loss`
    for candidate in candidates:
        try:
            return _coerce_toml(candidate, tp, where, source)
        except _Mismatch:
            continue
    raise _Mismatch


# ------------------------------------------------------------------ the config tree


def _describe(value) -> str:
    if isinstance(value, _Flag):
        return "no value (a bare flag)"
    if isinstance(value, _CliValue):
        return f"{str(value)!r}"
    return f"{value!r} ({type(value).__name__})"


def _display(where: str, source: str) -> str:
    return f"--{where}" if source == CLI_SOURCE else where


def _error(source: str, where: str, problem: str) -> ConfigError:
    return ConfigError(f"{source}: {_display(where, source)}: {problem}")


def _settable_fields(cls) -> dict[str, Any]:
    """``{name: type hint}`` of the init fields of dataclass ``cls``."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _is_section(node, name: str, hint) -> bool:
    return bool(
        _variants(hint)
        or dataclasses.is_dataclass(getattr(node, name, None))
        or _dataclass_types(hint)
    )


def _unknown_key(
    node, key: str, where: str, source: str, *, section: bool
) -> ConfigError:
    cls = type(node)
    settable = {
        n: hint for n, hint in _settable_fields(cls).items() if not _is_suppressed(hint)
    }
    if section:
        known = sorted(n for n, hint in settable.items() if _is_section(node, n, hint))
    else:
        known = sorted(settable)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    if section:
        return ConfigError(
            f"{source}: unknown section [{key}]: {cls.__qualname__} has no field "
            f"'{key}'.{hint} Known sections: {', '.join(known)}"
        )
    return _error(
        source,
        where,
        f"unknown key '{key}': {cls.__qualname__} has no such field.{hint} "
        f"Valid keys: {', '.join(known)}",
    )


def _new_node(cls, table: dict, where: str, source: str):
    """Build a dataclass from ``table`` (e.g. ``[[optimizer.param_groups]]`` items).

    Required fields (no default) go to the constructor; the rest are applied to
    the constructed instance, with the same checks as any other table.
    """
    hints = _settable_fields(cls)
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in table]
    if missing:
        raise _error(
            source,
            where,
            f"{cls.__qualname__} needs the key(s) {', '.join(missing)}",
        )
    kwargs = {}
    for name in required:
        try:
            kwargs[name] = _coerce(table[name], hints[name], f"{where}.{name}", source)
        except _Mismatch:
            raise _error(
                source,
                f"{where}.{name}",
                f"expected {_type_name(hints[name])}, got {_describe(table[name])}",
            ) from None
    try:
        node = cls(**kwargs)
    except (ValueError, TypeError, AssertionError) as e:
        raise _error(source, where, f"invalid {cls.__qualname__}: {e}") from e
    rest = {k: v for k, v in table.items() if k not in kwargs}
    _apply_table(node, rest, where, source, touched=None)
    post_init = getattr(node, "__post_init__", None)
    if post_init is not None:
        try:
            post_init()
        except (ValueError, TypeError, AssertionError) as e:
            raise _error(source, where, f"invalid {cls.__qualname__}: {e}") from e
    return node


def _apply_table(node, table: dict, prefix: str, source: str, touched) -> None:
    """Set ``table`` onto dataclass instance ``node`` (recursively, type-checked)."""
    fields = _settable_fields(type(node))
    for key, value in table.items():
        where = f"{prefix}.{key}" if prefix else key
        negated = key.startswith("no-") and key[3:] in fields
        if key not in fields and negated and isinstance(value, _Flag):
            # tyro-style `--section.no-field` for `--section.field false`
            key, value = key[3:], _Flag(False)
            where = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise _unknown_key(
                node,
                key,
                where,
                source,
                section=not prefix and isinstance(value, dict),
            )
        hint = fields[key]
        if _is_suppressed(hint):
            raise _error(
                source,
                where,
                "cannot be set from a config file or the command line; it is set "
                "in code by the base config function",
            )
        _set_field(node, key, hint, value, where, source, touched)
    if touched is not None:
        touched.append(node)


def _set_field(node, name: str, hint, value, where: str, source: str, touched) -> None:
    current = getattr(node, name)
    variants = _variants(hint)
    has_fields = _is_section(node, name, hint)
    if not (isinstance(value, dict) and has_fields):
        if has_fields and not (str(value) == "None" and _admits(hint, type(None))):
            if variants:
                detail = (
                    f"set its variant with `{name}.{MODE_KEY}` "
                    f"({', '.join(repr(v) for v in variants)}) and its fields as keys"
                )
            else:
                detail = f"set its fields as `{name}.<field>`"
            raise _error(source, where, f"is a section, not a value; {detail}")
        try:
            setattr(node, name, _coerce(value, hint, where, source))
        except _Mismatch:
            raise _error(
                source, where, f"expected {_type_name(hint)}, got {_describe(value)}"
            ) from None
        return

    table = dict(value)
    if variants:
        if MODE_KEY in table:
            mode = table.pop(MODE_KEY)
            mode = str(mode) if isinstance(mode, _CliValue) else mode
            if mode not in variants:
                raise _error(
                    source,
                    f"{where}.{MODE_KEY}",
                    f"expected one of {', '.join(repr(v) for v in variants)}, got {mode!r}",
                )
            cls = variants[mode]
            if cls is None:
                if table:
                    raise _error(
                        source,
                        where,
                        f"{MODE_KEY} = {mode!r} takes no other keys, got "
                        f"{', '.join(sorted(table))}",
                    )
                setattr(node, name, None)
                return
            if type(current) is not cls:
                current = cls()
                setattr(node, name, current)
        elif current is None:
            raise _error(
                source,
                where,
                f"is disabled (None) in the base config; set `{MODE_KEY}` to one of "
                f"{', '.join(repr(v) for v in variants if variants[v] is not None)}",
            )
    elif current is None:
        classes = _dataclass_types(hint)
        if len(classes) != 1:
            raise _error(
                source,
                where,
                f"is None in the base config and its type {_type_name(hint)} is "
                "ambiguous; set it in the base config function",
            )
        current = classes[0]()
        setattr(node, name, current)
    if not dataclasses.is_dataclass(current):
        raise _error(source, where, f"is not a section (type {_type_name(hint)})")
    _apply_table(current, table, where, source, touched)


def _validate(touched: list, root, sources: str) -> None:
    """Re-run ``__post_init__`` checks of every modified config, innermost first.

    ``setattr`` bypasses the validation dataclasses do at construction (e.g.
    ``ParallelismConfig`` checking ``spmd_backend``, ``Trainer.Config`` checking
    cross-section constraints); running them here reports a bad combination at
    load time rather than deep inside the Trainer.
    """
    seen: set[int] = set()
    for node in [*touched, root]:
        if id(node) in seen:
            continue
        seen.add(id(node))
        post_init = getattr(node, "__post_init__", None)
        if post_init is None:
            continue
        try:
            post_init()
        except (ValueError, TypeError, AssertionError) as e:
            raise ConfigError(
                f"invalid configuration after applying {sources} "
                f"({type(node).__qualname__}): {e}"
            ) from e


# ------------------------------------------------------------------ command line


def parse_overrides(args: list[str]) -> dict:
    """``["--a.b", "1", "--c=x", "--flag"]`` -> nested dict of raw CLI values.

    A token following ``--key`` is its value unless it starts with ``--`` (so
    negative numbers work); a ``--key`` without a value is a boolean flag.
    """
    nested: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(
                f"{CLI_SOURCE}: expected an override like --section.field VALUE, "
                f"got {arg!r}"
            )
        key, eq, raw = arg[2:].partition("=")
        if eq:
            value: Any = _CliValue(raw)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = _CliValue(args[i + 1])
            i += 1
        else:
            value = _Flag(True)
        parts = key.split(".")
        if any(not p for p in parts):
            raise ConfigError(f"{CLI_SOURCE}: malformed override key --{key}")
        table = nested
        for j, part in enumerate(parts[:-1]):
            sub = table.setdefault(part, {})
            if not isinstance(sub, dict):
                raise ConfigError(
                    f"{CLI_SOURCE}: --{'.'.join(parts[: j + 1])} is given both a "
                    f"value and sub-keys"
                )
            table = sub
        if isinstance(table.get(parts[-1]), dict):
            raise ConfigError(
                f"{CLI_SOURCE}: --{key} is given both a value and sub-keys"
            )
        table[parts[-1]] = value
        i += 1
    return nested


# ---------------------------------------------------------------------- loading


def _read_toml(path: str | os.PathLike) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"TOML config file not found: {os.fspath(path)}")
    if os.path.isdir(path):
        raise ConfigError(f"TOML config path is a directory, not a file: {path}")
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{os.fspath(path)}: invalid TOML: {e}") from e


def _job_settings(file_job: Any, cli_job: Any, path: str) -> tuple[dict, str]:
    """Merge ``[job]`` and ``--job.*``; also return the source naming the base."""
    settings: dict[str, Any] = {}
    base_source = path
    for source, table in ((path, file_job), (CLI_SOURCE, cli_job)):
        if table is None:
            continue
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{JOB_SECTION}] must be a table")
        for key, value in table.items():
            where = f"{JOB_SECTION}.{key}"
            if key not in _JOB_KEYS:
                close = difflib.get_close_matches(key, list(_JOB_KEYS), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise _error(
                    source,
                    where,
                    f"unknown key '{key}' in [{JOB_SECTION}].{hint} "
                    f"Valid keys: {', '.join(sorted(_JOB_KEYS))}",
                )
            if key in ("config", "module"):
                base_source = source
            try:
                settings[key] = _coerce(value, _JOB_KEYS[key], where, source)
            except _Mismatch:
                raise _error(
                    source,
                    where,
                    f"expected {_JOB_KEYS[key].__name__}, got {_describe(value)}",
                ) from None
    if "config" not in settings:
        raise ConfigError(
            f'{path}: missing [{JOB_SECTION}] config = "<function name>" naming the '
            f"base config function (in {settings.get('module', DEFAULT_CONFIG_MODULE)})"
        )
    return settings, base_source


def _base_config(module_name: str, fn_name: str, source: str):
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not (
            module_name == e.name or module_name.startswith(e.name + ".")
        ):
            raise  # a missing dependency inside the module: a real bug, keep it
        raise ConfigError(
            f"{source}: [{JOB_SECTION}] module = {module_name!r} cannot be imported ({e})"
        ) from e
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        available = sorted(
            n
            for n, v in vars(module).items()
            if callable(v)
            and not n.startswith("_")
            and getattr(v, "__module__", None) == module.__name__
            and not isinstance(v, type)
        )
        raise ConfigError(
            f"{source}: [{JOB_SECTION}] config = {fn_name!r} is not a function in "
            f"{module_name}. Available: {', '.join(available) or '(none)'}"
        )
    config = fn()
    if not isinstance(config, Trainer.Config):
        raise ConfigError(
            f"{source}: {module_name}.{fn_name}() returned {type(config).__qualname__}, "
            "expected Trainer.Config"
        )
    return config


def load_toml_config(
    path: str | os.PathLike, overrides: list[str] | None = None
) -> Trainer.Config:
    """Build a ``Trainer.Config`` from a TOML job file plus ``--section.field`` flags.

    See the module docstring for the schema. Raises ``FileNotFoundError`` for a
    missing file and :class:`ConfigError` (a ``ValueError``) for anything else
    wrong in the file or the overrides.
    """
    path_str = os.fspath(path)
    data = _read_toml(path)
    cli = parse_overrides(list(overrides or []))

    job, job_source = _job_settings(
        data.pop(JOB_SECTION, None), cli.pop(JOB_SECTION, None), path_str
    )
    config = _base_config(
        job.get("module", DEFAULT_CONFIG_MODULE), job["config"], job_source
    )
    if job.get("debug_assets", False):
        from torchtitan_nemotron3.train.assets import use_debug_assets

        use_debug_assets(config)

    touched: list = []
    _apply_table(config, data, "", path_str, touched)
    _apply_table(config, cli, "", CLI_SOURCE, touched)
    sources = path_str + (" and command-line overrides" if cli else "")
    _validate(touched, config, sources)
    return config
