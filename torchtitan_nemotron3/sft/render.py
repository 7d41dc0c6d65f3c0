"""A conversation rendered by the tokenizer's own chat template, and which of its
tokens the assistant produced.

The template is the model's (``chat_template.jinja`` or ``tokenizer_config.json``'s
``chat_template`` in ``hf_assets_path``, or ``template.path``), rendered the way
transformers renders it (sandboxed Jinja, ``trim_blocks``/``lstrip_blocks``, the
special tokens as variables, ``{% generation %}`` accepted), with the options the job
file sets (``enable_thinking``, ``truncate_history_thinking``).

Why not TorchTitan's ``ChatDataset`` mask (the prompt's rendered length): that holds
for one ``[user, assistant]`` pair only. In a multi-turn conversation each assistant
turn has its own span, and a template may rewrite history: Nemotron's
``truncate_history_thinking`` replaces the reasoning of assistant turns before the
last user message by ``<think></think>``, so a prefix rendered alone is not a
prefix of the whole. The spans are therefore found in the *whole* rendered text:
each assistant turn is its role header (``<|im_start|>assistant\\n``) followed by
what the assistant produced, up to and including the end-of-turn text
(``<|im_end|>``). Header and end-of-turn are read off the template itself by
rendering a probe conversation (or set in the job file), and the number of headers
found must equal the number of assistant messages, else the row is reported.

A token is trained when its first character lies inside a span; the labels of a
conversation's tokens ``t[1:]`` keep ``t[j]`` where token j is trained, ``-100``
elsewhere.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Literal

from .chat_data import ChatDataError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
_PROBE_USER = "Hello there."
_PROBE_ANSWER = "PROBE_ANSWER_7f3a"


@dataclass(kw_only=True, slots=True)
class ChatTemplateConfig:
    """How conversations are rendered (the template's own options included)."""

    path: str | None = None
    """A .jinja file to use instead of the template in ``hf_assets_path``."""

    enable_thinking: bool | None = None
    """Passed to the template (Nemotron: the generation prompt opens <think>);
    None: the template's default."""

    truncate_history_thinking: bool | None = None
    """Passed to the template (Nemotron, default true: reasoning of assistant turns
    before the last user message is rendered as <think></think>, and trained so);
    None: the template's default."""

    reasoning_inline: bool = False
    """Write ``reasoning_content`` into the content as "<think>\\n...\\n</think>\\n"
    before rendering, for templates that ignore ``reasoning_content``."""

    assistant_header: str | None = None
    """Text that opens an assistant turn; None: read off the template."""

    end_of_turn: str | None = None
    """Text that closes an assistant turn (trained); None: read off the template."""


def read_chat_template(assets_dir: str, override: str | None = None) -> tuple[str, str]:
    """``(source, origin)``: the template text and the file it came from, with
    TorchTitan's and transformers' priority (the .jinja file before the JSON)."""
    if override:
        if not os.path.isfile(override):
            raise ChatDataError(f"{override}: chat template file not found")
        with open(override, encoding="utf-8") as f:
            return f.read(), override
    jinja = os.path.join(assets_dir, CHAT_TEMPLATE_FILE)
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read(), jinja
    config_path = os.path.join(assets_dir, "tokenizer_config.json")
    template = None
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
    if not isinstance(template, str) or not template.strip():
        raise ChatDataError(
            f"{assets_dir}: no chat template (no {CHAT_TEMPLATE_FILE}, no "
            "'chat_template' in tokenizer_config.json); chat SFT renders conversations "
            "with the model's template: set dataloader.template.path to a .jinja file"
        )
    return template, config_path


def _special_tokens(assets_dir: str) -> dict[str, str]:
    """bos_token, eos_token, ... as template variables (transformers passes them)."""
    path = os.path.join(assets_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def _environment():
    import jinja2
    import jinja2.sandbox
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols

    class GenerationTag(Extension):
        """transformers' ``{% generation %}...{% endgeneration %}`` marks; rendered
        as their body (the spans here do not depend on them)."""

        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
            sort_keys=sort_keys,
        )  # fmt: skip

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, GenerationTag]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """The model's chat template with the job's options bound."""

    def __init__(self, source: str, *, origin: str, variables: dict[str, Any]):
        import jinja2

        self.origin = origin
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatDataError(
                f"{origin}: chat template line {e.lineno}: {e}"
            ) from None
        self.variables = variables

    @classmethod
    def from_assets(cls, assets_dir: str, config: ChatTemplateConfig) -> ChatTemplate:
        source, origin = read_chat_template(assets_dir, config.path)
        variables: dict[str, Any] = _special_tokens(assets_dir)
        for key in ("enable_thinking", "truncate_history_thinking"):
            if getattr(config, key) is not None:
                variables[key] = getattr(config, key)
        return cls(source, origin=origin, variables=variables)

    def render(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = False,
        where: str = "",
    ) -> str:
        """The conversation as text; ``where`` (file and row) names it in errors."""
        import jinja2

        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                **self.variables,
            )
        except jinja2.TemplateError as e:
            raise ChatDataError(
                f"{where or self.origin}: the chat template ({self.origin}) refused "
                f"the conversation: {e}"
            ) from None


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def detect_turn_markers(template: ChatTemplate) -> tuple[str, str]:
    """``(assistant_header, end_of_turn)`` read off the template: the header is what
    the generation prompt and a rendered assistant turn share, up to its last
    newline (Nemotron's prompt goes on with "<think>\\n", which belongs to the
    turn); the end of turn is the text after the answer, up to whitespace."""
    user = [{"role": "user", "content": _PROBE_USER}]
    answer = user + [{"role": "assistant", "content": _PROBE_ANSWER}]
    head = template.render(user)
    prompt = template.render(user, add_generation_prompt=True)
    full = template.render(answer)
    hint = (
        "set dataloader.template.assistant_header and dataloader.template.end_of_turn"
    )
    if not (
        prompt.startswith(head) and full.startswith(head) and _PROBE_ANSWER in full
    ):
        raise ChatDataError(
            f"{template.origin}: cannot read the assistant turn markers off this "
            f"template (a rendered prefix is not a prefix of the whole); {hint}"
        )
    turn = full[len(head) :]
    header = _common_prefix(prompt[len(head) :], turn)
    if "\n" in header and not header.endswith("\n"):
        header = header[: header.rfind("\n") + 1]
    tail = turn[turn.index(_PROBE_ANSWER) + len(_PROBE_ANSWER) :]
    end = tail.split()[0] if tail.split() else ""
    if not header.strip() or not end:
        raise ChatDataError(
            f"{template.origin}: cannot read the assistant turn markers off this "
            f"template (header {header!r}, end of turn {end!r}); {hint}"
        )
    return header, end


@dataclass(slots=True)
class EncodedChat:
    """One conversation: its tokens and which of them the assistant produced."""

    tokens: list[int]
    trained: list[bool]


class ChatEncoder:
    """Render, find the assistant spans, tokenize: ``encode(messages) -> EncodedChat``."""

    def __init__(
        self,
        template: ChatTemplate,
        tokenizer,  # tokenizers.Tokenizer
        *,
        config: ChatTemplateConfig,
        assistant_turns: Literal["all", "last"] = "all",
    ):
        self.template, self.tokenizer = template, tokenizer
        self.reasoning_inline = config.reasoning_inline
        self.assistant_turns = assistant_turns
        if config.assistant_header and config.end_of_turn:
            self.header, self.end = config.assistant_header, config.end_of_turn
        else:
            header, end = detect_turn_markers(template)
            self.header = config.assistant_header or header
            self.end = config.end_of_turn or end

    def render(self, messages: list[dict], where: str = "") -> str:
        if self.reasoning_inline:
            messages = [_inline(m) for m in messages]
        return self.template.render(messages, where=where)

    def spans(
        self, text: str, messages: list[dict], where: str = ""
    ) -> list[tuple[int, int]]:
        """Character spans ``[start, end)`` of every assistant turn's produced text."""
        expected = sum(m["role"] == "assistant" for m in messages)
        spans, pos = [], 0
        while (h := text.find(self.header, pos)) >= 0:
            start = h + len(self.header)
            e = text.find(self.end, start)
            if e < 0:
                raise ChatDataError(
                    f"{where}: assistant turn {len(spans) + 1} has no end of turn "
                    f"{self.end!r} in the rendered conversation"
                )
            pos = e + len(self.end)
            spans.append((start, pos))
        if len(spans) != expected:
            raise ChatDataError(
                f"{where}: the rendered conversation has {len(spans)} assistant turns "
                f"({self.header!r} ... {self.end!r}) for {expected} assistant messages "
                "(a message contains the marker text, or the template dropped a turn; "
                "dataloader.template.assistant_header/end_of_turn set them)"
            )
        return spans[-1:] if self.assistant_turns == "last" else spans

    def encode(self, messages: list[dict], where: str = "") -> EncodedChat:
        text = self.render(messages, where)
        spans = self.spans(text, messages, where)
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        trained, k = [], 0
        for start, _ in encoding.offsets:
            while k < len(spans) and spans[k][1] <= start:
                k += 1
            trained.append(k < len(spans) and spans[k][0] <= start)
        return EncodedChat(tokens=list(encoding.ids), trained=trained)


def _inline(message: dict) -> dict:
    reasoning = message.get("reasoning_content")
    if message["role"] != "assistant" or not reasoning:
        return message
    out = {k: v for k, v in message.items() if k != "reasoning_content"}
    out["content"] = f"<think>\n{reasoning}\n</think>\n{message['content']}"
    return out
