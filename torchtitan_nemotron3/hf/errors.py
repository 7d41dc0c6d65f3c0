"""What a bad checkpoint raises: one line naming the file (and tensor) at fault."""

import json
import os
from typing import Any

_SHOWN = 8  # names listed per kind of problem in an error message


def listing(names: list[str]) -> str:
    """``a, b, c … and N more``: an error message stays one readable line."""
    more = f" … and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


class CheckpointMismatchError(ValueError):
    """The tensors of a checkpoint do not fit the architecture of its config.json."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file cannot be read (truncated, malformed JSON or safetensors
    header) or holds non-finite values."""


def read_json(file: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from ``file``; ``CorruptCheckpointError`` naming the file and
    the position when it is not one (an interrupted copy, a hand edit)."""
    file = os.fspath(file)
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(
            f"{file}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        ) from None
    except UnicodeDecodeError:
        raise CorruptCheckpointError(f"{file}: not a UTF-8 text file") from None
    if not isinstance(value, dict):
        raise CorruptCheckpointError(
            f"{file}: expected a JSON object, found {type(value).__name__}"
        )
    return value
