"""Chat rows as OpenAI-style ``messages``, from local JSONL/Parquet files or the hub.

A row becomes ``[{"role", "content", ["reasoning_content"], ...}, ...]``: either a
``messages`` column (any name; ShareGPT's ``from``/``value`` keys and ``human``/
``gpt`` roles map through :class:`ChatColumns`), or prompt/response columns for
single-turn layouts. Reasoning is kept where the row has it, in
``reasoning_content`` or inline ``<think>...</think>``: the chat template decides
how it is rendered.

Bad data stops the run with :class:`ChatDataError` naming the file, the row and the
problem. A bad row is never skipped silently: a skipped row would mean a dataset
whose every row is bad trains on nothing and nobody notices.

The rows themselves come from :mod:`.sources`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class ChatDataError(ValueError):
    """A bad chat source or row; the message names the file, the row and the problem."""


@dataclass(kw_only=True, slots=True)
class ChatColumns:
    """Where a row keeps its conversation."""

    messages: str = "messages"
    """Column holding the list of messages (OpenAI layout; ShareGPT: "conversations")."""

    role_key: str = "role"
    """Key of a message's role (ShareGPT: "from")."""

    content_key: str = "content"
    """Key of a message's text (ShareGPT: "value")."""

    reasoning_key: str = "reasoning_content"
    """Key of an assistant message's reasoning, rendered by the template as <think>."""

    role_aliases: list[str] = field(
        default_factory=lambda: ["human:user", "gpt:assistant", "model:assistant"]
    )
    """"from:to" role renames applied before the role check."""

    prompt: str = ""
    """Single-turn layout: the user column (set it to use prompt/response columns
    instead of ``messages``)."""

    response: str = ""
    """Single-turn layout: the assistant column."""

    reasoning: str = ""
    """Single-turn layout: optional column with the assistant's reasoning."""

    system: str = ""
    """Single-turn layout: optional column with a system prompt."""

    def __post_init__(self):
        bad = [a for a in self.role_aliases if a.count(":") != 1]
        if bad:
            raise ValueError(
                f"dataloader.columns.role_aliases: {bad}: each entry is 'from:to'"
            )

    def names(self) -> list[str]:
        """The columns a conversation is read from."""
        if self.prompt:
            keys = (self.prompt, self.response, self.reasoning, self.system)
            return [c for c in keys if c]
        return [self.messages]


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def to_messages(
    row: dict[str, Any],
    columns: ChatColumns,
    where: str,
    *,
    require_assistant: bool = True,
) -> list[dict]:
    """The row's conversation as template-ready messages; ``ChatDataError`` (naming
    ``where``: file and row) for anything the template could not render faithfully.
    ``require_assistant=False`` reads a prompt (preference data), which has none."""
    if columns.prompt:
        return _single_turn(row, columns, where)
    if columns.messages not in row:
        raise ChatDataError(
            f"{where}: no '{columns.messages}' column (the row has: "
            f"{', '.join(map(str, row)) or 'nothing'}); set "
            "dataloader.columns.messages, or columns.prompt/columns.response for "
            "single-turn rows"
        )
    raw = row[columns.messages]
    if isinstance(raw, str):  # some datasets store the list as a JSON string
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            pass
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ChatDataError(
            f"{where}: '{columns.messages}' must be a non-empty list of messages, got "
            f"{type(raw).__name__}"
        )
    aliases = dict(a.split(":", 1) for a in columns.role_aliases)
    messages = []
    for i, m in enumerate(raw, start=1):
        if not isinstance(m, dict):
            raise ChatDataError(
                f"{where}: message {i} is {type(m).__name__}, not a dict"
            )
        role = m.get(columns.role_key)
        if isinstance(role, str):  # (a list or dict role is unhashable)
            role = aliases.get(role, role)
        if not isinstance(role, str) or role not in ROLES:
            raise ChatDataError(
                f"{where}: message {i}: unknown role {role!r} (expected one of "
                f"{', '.join(ROLES)}; rename others with dataloader.columns.role_aliases)"
            )
        content = m.get(columns.content_key)
        if content is not None and not isinstance(content, str):
            raise ChatDataError(
                f"{where}: message {i} ({role}): content is {type(content).__name__}, "
                "not a string"
            )
        # Keep the other keys (tool_calls, ...) for the template; drop None values
        # Arrow gives rows that lack a key other rows have.
        out = {
            k: v
            for k, v in m.items()
            if v is not None and k not in (columns.role_key, columns.content_key)
        }
        out["role"], out["content"] = role, content or ""
        reasoning = m.get(columns.reasoning_key)
        out.pop(columns.reasoning_key, None)
        if role == "assistant":
            if _text(reasoning):
                out["reasoning_content"] = reasoning
            if not (_text(content) or _text(reasoning) or out.get("tool_calls")):
                raise ChatDataError(
                    f"{where}: message {i}: empty assistant turn (no content, "
                    "reasoning or tool calls): nothing to train on"
                )
        messages.append(out)
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ChatDataError(f"{where}: no assistant message: nothing to train on")
    return messages


def _single_turn(row: dict[str, Any], columns: ChatColumns, where: str) -> list[dict]:
    for key in (columns.prompt, columns.response):
        if key not in row:
            raise ChatDataError(
                f"{where}: no '{key}' column (the row has: {', '.join(map(str, row))})"
            )
    if not _text(row[columns.response]):
        raise ChatDataError(
            f"{where}: empty assistant turn ('{columns.response}' is empty)"
        )
    messages = []
    if columns.system and _text(row.get(columns.system)):
        messages.append({"role": "system", "content": row[columns.system]})
    messages.append({"role": "user", "content": str(row[columns.prompt])})
    answer = {"role": "assistant", "content": row[columns.response]}
    if columns.reasoning and _text(row.get(columns.reasoning)):
        answer["reasoning_content"] = row[columns.reasoning]
    messages.append(answer)
    return messages
