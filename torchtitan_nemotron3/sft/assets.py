"""Offline assets for the debug SFT run: a chat dataset, a ChatML template with
think tags, and a tokenizer that knows the chat's special tokens.

* chat data: multi-turn conversations (1-3 exchanges, optional system prompt) about
  word arithmetic, weekdays and months, every answer with its reasoning, given as
  ``reasoning_content`` in half the rows and inline ``<think>...</think>`` in the
  other half; follow-up questions refer to the previous answer. ``train.jsonl`` and
  a held-out ``validation.jsonl`` (a different seed).
* template (``chat_template.jinja``): ChatML ``<|im_start|>role\\n...<|im_end|>`` that
  behaves like Nemotron-3's on assistant turns: reasoning from ``reasoning_content``
  or inline, ``<think></think>`` when there is none, ``truncate_history_thinking``
  (default true) rendering turns before the last user message as
  ``<think></think>\n`` + answer, ``enable_thinking`` choosing the generation prompt. Written for this package;
  :func:`chat_template` can add ``{% generation %}`` marks for transformers.
* tokenizer: the debug BPE (``train/assets.py``) retrained with ``<|im_start|>``,
  ``<|im_end|>``, ``<think>``, ``</think>`` as special tokens, on the debug corpus
  plus the rendered chats, still 2048 ids (the debug model's vocabulary).
  ``eos_token`` is ``<|im_end|>``, as in Nemotron's tokenizer.

Deterministic and cached next to the pretraining assets, built in a temporary
directory renamed into place (concurrent ranks never see half of it). Changing the
output means bumping ``SFT_ASSETS_VERSION``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from ..train.assets import (
    _DAYS,
    _MONTHS,
    _NUMBER_WORDS,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    build_once,
    default_assets_root,
    generate_corpus,
)

SFT_ASSETS_VERSION = 1
NUM_TRAIN, NUM_VALIDATION = 2000, 200
TRAIN_SEED, VALIDATION_SEED = 4321, 8765
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")

_TEMPLATE = (
    "{%- set enable_thinking = enable_thinking if enable_thinking is defined else true %}\n"
    "{%- set truncate_history_thinking = truncate_history_thinking "
    "if truncate_history_thinking is defined else true %}\n"
    "{%- set ns = namespace(last_user=-1) %}\n"
    "{%- for m in messages %}{% if m.role == 'user' %}"
    "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}\n"
    "{%- for m in messages %}\n"
    "{%- if m.role == 'assistant' %}\n"
    "{%- set content = m.content if m.content is string else '' %}\n"
    "{%- set reasoning = '' %}\n"
    "{%- if m.reasoning_content is string and m.reasoning_content | trim %}\n"
    "{%- set reasoning = m.reasoning_content | trim %}\n"
    "{%- elif '</think>' in content %}\n"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] | trim %}\n"
    "{%- set content = content.split('</think>')[-1] %}\n"
    "{%- endif %}\n"
    "{%- if reasoning and truncate_history_thinking and loop.index0 < ns.last_user %}"
    "{% set think = '<think></think>\\n' %}"
    "{%- elif reasoning %}{% set think = '<think>\\n' ~ reasoning ~ '\\n</think>\\n' %}"
    "{%- else %}{% set think = '<think></think>' %}{% endif %}\n"
    "{{- '<|im_start|>assistant\\n' }}@GEN@{{- think }}"
    "{{- content | trim }}{{- '<|im_end|>' }}@ENDGEN@{{- '\\n' }}\n"
    "{%- else %}\n"
    "{{- '<|im_start|>' ~ m.role ~ '\\n' ~ m.content ~ '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' ~ ('<think>\\n' if enable_thinking else '<think></think>') }}"
    "{%- endif %}\n"
)


def chat_template(generation_marks: bool = False) -> str:
    """The debug template; with ``generation_marks``, transformers' ``{% generation
    %}`` around what the assistant produces (for ``return_assistant_tokens_mask``;
    TorchTitan's tokenizer cannot compile those tags, so the shipped file has none)."""
    marks = (
        ("{% generation %}", "{% endgeneration %}") if generation_marks else ("", "")
    )
    return _TEMPLATE.replace("@GEN@", marks[0]).replace("@ENDGEN@", marks[1])


CHAT_TEMPLATE = chat_template()

_SYSTEMS = [
    "You are a careful assistant. Think before you answer.",
    "You are a helpful assistant who explains each step.",
    "Answer briefly and correctly.",
]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _sum_turn(rng: random.Random, prev: int | None) -> tuple[str, str, str, int]:
    """(question, reasoning, answer, value): a sum in words, or a follow-up on the
    previous answer."""
    if prev is not None and prev <= 15 and rng.random() < 0.6:
        b = rng.randint(1, 20 - prev)
        q = f"And if you add {_NUMBER_WORDS[b]} to that?"
        r = (
            f"The previous answer was {_NUMBER_WORDS[prev]}, which is {prev}. "
            f"{prev} + {b} = {prev + b}, which is {_NUMBER_WORDS[prev + b]}."
        )
        return q, r, f"That makes {_NUMBER_WORDS[prev + b]}.", prev + b
    a, b = rng.randint(0, 10), rng.randint(0, 10)
    q = rng.choice(["What is {a} plus {b}?", "How much is {a} plus {b}?"]).format(
        a=_NUMBER_WORDS[a], b=_NUMBER_WORDS[b]
    )
    r = (
        f"{_cap(_NUMBER_WORDS[a])} is {a} and {_NUMBER_WORDS[b]} is {b}. "
        f"{a} + {b} = {a + b}, which is {_NUMBER_WORDS[a + b]}."
    )
    return (
        q,
        r,
        f"{_cap(_NUMBER_WORDS[a])} plus {_NUMBER_WORDS[b]} is {_NUMBER_WORDS[a + b]}.",
        a + b,
    )


def _sequence_turn(rng: random.Random) -> tuple[str, str, str]:
    names, kind = (_DAYS, "day") if rng.random() < 0.5 else (_MONTHS, "month")
    i = rng.randrange(len(names))
    k = rng.randint(1, 3)
    steps = [names[(i + j) % len(names)] for j in range(k + 1)]
    if k == 1:
        q = f"Which {kind} comes after {names[i]}?"
    else:
        q = f"Which {kind} is {_NUMBER_WORDS[k]} after {names[i]}?"
    r = f"Counting from {names[i]}: {', '.join(steps)}. So it is {steps[-1]}."
    return q, r, f"It is {steps[-1]}."


def generate_chats(num: int, seed: int) -> list[dict]:
    """``num`` rows ``{"messages": [...]}``; identical for identical arguments."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        inline = rng.random() < 0.5
        messages = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": rng.choice(_SYSTEMS)})
        prev = None
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.6:
                q, r, a, prev = _sum_turn(rng, prev)
            else:
                (q, r, a), prev = _sequence_turn(rng), None
            messages.append({"role": "user", "content": q})
            if rng.random() < 0.15:  # an answer without reasoning
                messages.append({"role": "assistant", "content": a})
            elif inline:
                messages.append(
                    {"role": "assistant", "content": f"<think>\n{r}\n</think>\n{a}"}
                )
            else:
                messages.append(
                    {"role": "assistant", "content": a, "reasoning_content": r}
                )
        rows.append({"messages": messages})
    return rows


def _render_all(rows: list[dict]) -> list[str]:
    import jinja2

    template = jinja2.Environment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    ).from_string(CHAT_TEMPLATE)
    return [template.render(messages=r["messages"]) for r in rows]


def _train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[*SPECIAL_TOKENS, *CHAT_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _tokenizer_config(tokenizer) -> dict:
    added = {
        str(tokenizer.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in (*SPECIAL_TOKENS, *CHAT_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": "<|im_end|>",
        "pad_token": SPECIAL_TOKENS[2],
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
    }


def _write(out: Path) -> None:
    train = generate_chats(NUM_TRAIN, TRAIN_SEED)
    validation = generate_chats(NUM_VALIDATION, VALIDATION_SEED)
    (out / "chat").mkdir()
    for name, rows in (("train", train), ("validation", validation)):
        with open(out / "chat" / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (out / "tokenizer").mkdir()
    tokenizer = _train_tokenizer(generate_corpus() + _render_all(train))
    tokenizer.save(str(out / "tokenizer" / "tokenizer.json"))
    with open(out / "tokenizer" / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(_tokenizer_config(tokenizer), f, indent=2, sort_keys=True)
        f.write("\n")
    (out / "tokenizer" / "chat_template.jinja").write_text(
        CHAT_TEMPLATE, encoding="utf-8"
    )


def ensure_debug_sft_assets(root: str | os.PathLike | None = None) -> tuple[str, str]:
    """``(tokenizer_dir, chat_dir)``, absolute, generated once under ``root``
    (default: the debug assets root; ``train.assets.build_once``); ``chat_dir``
    holds train/validation.jsonl."""
    root = Path(root) if root is not None else default_assets_root()
    name = (
        f"sft-v{SFT_ASSETS_VERSION}-chats{NUM_TRAIN}-vocab{VOCAB_SIZE}-seed{TRAIN_SEED}"
    )
    final = build_once(root, name, _write)
    return str(final / "tokenizer"), str(final / "chat")
