"""Preference rows as ``(prompt messages, chosen reply, rejected reply)``.

Two layouts, as TRL reads them:

* explicit prompt: ``prompt`` (a string, or a list of messages ending with a user
  or tool turn), ``chosen`` and ``rejected`` (a string, or a list holding one
  assistant message);
* implicit prompt: no ``prompt`` column; ``chosen`` and ``rejected`` are whole
  conversations that share every message but the last, an assistant turn each.

A reply is one assistant message (its reasoning, in ``reasoning_content`` or inline
``<think>``, included): DPO compares the two replies' log-probabilities, so only the
final assistant turn is scored. Anything else is refused naming the file and the
row (a silently skipped pair would shift every later pair's place in the data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..sft.chat_data import ChatColumns, ChatDataError, to_messages


@dataclass(kw_only=True, slots=True)
class PairColumns:
    """Where a row keeps its preference pair."""

    prompt: str = "prompt"
    """The prompt: a string (one user turn) or a list of messages. Absent from the
    row: the prompt is the shared prefix of ``chosen`` and ``rejected``."""

    chosen: str = "chosen"
    rejected: str = "rejected"

    messages: ChatColumns = field(default_factory=ChatColumns)
    """How a list of messages is read (role/content keys, role aliases)."""


@dataclass(slots=True)
class PreferencePair:
    prompt: list[dict]
    chosen: list[dict]  # prompt + the chosen assistant message
    rejected: list[dict]  # prompt + the rejected assistant message


def _messages(value: Any, columns: PairColumns, where: str) -> list[dict]:
    row = {columns.messages.messages: value}
    return to_messages(row, columns.messages, where, require_assistant=False)


def _reply(value: Any, columns: PairColumns, where: str, name: str) -> dict:
    if isinstance(value, str):
        if not value.strip():
            raise ChatDataError(f"{where}: '{name}' is empty")
        return {"role": "assistant", "content": value}
    if not isinstance(value, (list, tuple)) or len(value) != 1:
        raise ChatDataError(
            f"{where}: '{name}' must be a string or a list of one assistant message, "
            f"got {type(value).__name__}"
            + (f" of {len(value)} messages" if isinstance(value, (list, tuple)) else "")
        )
    (message,) = _messages(list(value), columns, f"{where} ['{name}']")
    if message["role"] != "assistant":
        raise ChatDataError(
            f"{where}: '{name}' holds a {message['role']!r} message, not an assistant one"
        )
    return message


def to_pair(row: dict[str, Any], columns: PairColumns, where: str) -> PreferencePair:
    """The row's pair; ``ChatDataError`` naming ``where`` (file and row) otherwise."""
    for key in (columns.chosen, columns.rejected):
        if key not in row:
            raise ChatDataError(
                f"{where}: no '{key}' column (the row has: "
                f"{', '.join(map(str, row)) or 'nothing'})"
            )
    if columns.prompt in row:
        prompt = row[columns.prompt]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ChatDataError(f"{where}: '{columns.prompt}' is empty")
            prompt = [{"role": "user", "content": prompt}]
        else:
            prompt = _messages(prompt, columns, f"{where} ['{columns.prompt}']")
        chosen = _reply(row[columns.chosen], columns, where, columns.chosen)
        rejected = _reply(row[columns.rejected], columns, where, columns.rejected)
    else:
        full_c = _messages(row[columns.chosen], columns, f"{where} ['{columns.chosen}']")
        full_r = _messages(
            row[columns.rejected], columns, f"{where} ['{columns.rejected}']"
        )
        if not full_c or not full_r or full_c[:-1] != full_r[:-1]:
            raise ChatDataError(
                f"{where}: without a '{columns.prompt}' column, '{columns.chosen}' and "
                f"'{columns.rejected}' must be conversations that differ only in "
                "their last message"
            )
        prompt, chosen, rejected = full_c[:-1], full_c[-1], full_r[-1]
        for name, m in ((columns.chosen, chosen), (columns.rejected, rejected)):
            if m["role"] != "assistant":
                raise ChatDataError(
                    f"{where}: the last message of '{name}' is {m['role']!r}, not "
                    "the assistant's reply"
                )
    if not prompt or prompt[-1]["role"] not in ("user", "tool"):
        raise ChatDataError(
            f"{where}: the prompt must end with a user or tool message (it "
            f"{'is empty' if not prompt else 'ends with ' + repr(prompt[-1]['role'])})"
        )
    return PreferencePair(prompt, prompt + [chosen], prompt + [rejected])
