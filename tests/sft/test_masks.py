"""Assistant-only labels: the trained tokens are exactly the assistant spans.

The independent computation is transformers' ``apply_chat_template(...,
return_assistant_tokens_mask=True)`` on the same template with ``{% generation %}``
marks around what the assistant produces; ours finds the spans from the turn
markers in the whole rendered text and never looks at those marks. Compared token
by token on multi-turn conversations with reasoning (``reasoning_content``, inline
``<think>``, none), with ``truncate_history_thinking`` on (history rewritten) and off.
"""

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from torchtitan_nemotron3.sft import (
    ChatColumns,
    ChatEncoder,
    ChatTemplate,
    ChatTemplateConfig,
    make_document,
    to_messages,
)
from torchtitan_nemotron3.sft.assets import (
    chat_template,
    ensure_debug_sft_assets,
    generate_chats,
)

CHATS = [
    to_messages(r, ChatColumns(), f"row {i}")
    for i, r in enumerate(generate_chats(60, 7))
]
MULTI_TURN_WITH_REASONING = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four.", "reasoning_content": "2 + 2 = 4."},
    {"role": "user", "content": "And plus one?"},
    {"role": "assistant", "content": "<think>\n4 + 1 = 5.\n</think>\nFive."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]


@pytest.fixture(scope="module")
def tokenizer_dir():
    return ensure_debug_sft_assets()[0]


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    tok.chat_template = chat_template(generation_marks=True)
    return tok


def _encoder(tokenizer_dir, truncate, turns="all"):
    from tokenizers import Tokenizer

    config = ChatTemplateConfig(truncate_history_thinking=truncate)
    template = ChatTemplate.from_assets(tokenizer_dir, config)
    fast = Tokenizer.from_file(f"{tokenizer_dir}/tokenizer.json")
    return ChatEncoder(template, fast, config=config, assistant_turns=turns)


def _reference(hf_tokenizer, messages, truncate):
    out = hf_tokenizer.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        truncate_history_thinking=truncate,
    )
    return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]


@pytest.mark.parametrize("truncate", [True, False])
def test_trained_tokens_equal_transformers_assistant_mask(
    tokenizer_dir, hf_tokenizer, truncate
):
    encoder = _encoder(tokenizer_dir, truncate)
    multi = 0
    for messages in [MULTI_TURN_WITH_REASONING, *CHATS]:
        ours = encoder.encode(messages)
        tokens, mask = _reference(hf_tokenizer, messages, truncate)
        assert ours.tokens == tokens
        assert ours.trained == mask, hf_tokenizer.decode(tokens)
        multi += sum(m["role"] == "assistant" for m in messages) > 1
    assert multi >= 10  # the comparison covers many multi-turn conversations


def test_truncate_history_thinking_rewrites_history_and_the_mask_follows(
    tokenizer_dir, hf_tokenizer
):
    """With truncation on the first turn's reasoning is not in the rendered text, so
    a mask from separately rendered prefixes would be wrong; ours trains what is
    rendered: "<think></think>\\nFour.<|im_end|>" for turn 1, the full reasoning
    for the last turn."""
    spans = {}
    for truncate in (True, False):
        encoder = _encoder(tokenizer_dir, truncate)
        enc = encoder.encode(MULTI_TURN_WITH_REASONING)
        spans[truncate] = _trained_pieces(hf_tokenizer, enc.tokens, enc.trained)
    assert spans[True] == [
        "<think></think>\nFour.<|im_end|>",
        "<think></think>\nFive.<|im_end|>",
        "<think></think>You are welcome.<|im_end|>",
    ]
    assert spans[False] == [
        "<think>\n2 + 2 = 4.\n</think>\nFour.<|im_end|>",
        "<think>\n4 + 1 = 5.\n</think>\nFive.<|im_end|>",
        "<think></think>You are welcome.<|im_end|>",
    ]


def _trained_pieces(tok, tokens, trained) -> list[str]:
    pieces, current = [], []
    for t, keep in zip(tokens, trained):
        if keep:
            current.append(t)
        elif current:
            pieces.append(tok.decode(current))
            current = []
    if current:
        pieces.append(tok.decode(current))
    return pieces


def test_last_turn_only(tokenizer_dir, hf_tokenizer):
    encoder = _encoder(tokenizer_dir, False, turns="last")
    for messages in [MULTI_TURN_WITH_REASONING, *CHATS[:20]]:
        ours = encoder.encode(messages)
        _, mask = _reference(hf_tokenizer, messages, False)
        last_start = max(
            i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1])
        )
        assert ours.trained == [m and i >= last_start for i, m in enumerate(mask)]


def test_labels_are_the_next_token_where_it_is_an_assistant_token(tokenizer_dir):
    enc = _encoder(tokenizer_dir, False).encode(MULTI_TURN_WITH_REASONING)
    doc, note = make_document(enc.tokens, enc.trained, 1024, "drop")
    assert note == "" and doc.inputs == enc.tokens[:-1]
    for j, label in enumerate(doc.labels):
        assert label == (enc.tokens[j + 1] if enc.trained[j + 1] else -100)
    # the end-of-turn token is trained; the role header is not
    im_end, im_start = (
        enc.tokens[max(j for j, k in enumerate(enc.trained) if k)],
        enc.tokens[0],
    )
    assert im_end in doc.labels and im_start not in doc.labels


def test_markers_are_read_off_the_template(tokenizer_dir):
    encoder = _encoder(tokenizer_dir, None)
    assert (encoder.header, encoder.end) == ("<|im_start|>assistant\n", "<|im_end|>")


NANO_ASSETS = (
    Path(__file__).resolve().parents[2]
    / "assets/hf/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"
)


@pytest.mark.skipif(
    not (NANO_ASSETS / "tokenizer.json").is_file(),
    reason="Nemotron-3-Nano tokenizer not downloaded (scripts/download_hf_assets.py "
    "--assets tokenizer config)",
)
@pytest.mark.parametrize("truncate", [True, False])
def test_real_nemotron_template(truncate):
    """With the Nano tokenizer and its own template: each assistant turn's produced
    text, written out independently from the template's documented behaviour
    (reasoning as "<think>\\n...\\n</think>\\n", emptied to "<think></think>\\n" before
    the last user message when truncating, "<think></think>" when there is none),
    is located in the rendered text; its tokens are exactly the trained ones."""
    from tokenizers import Tokenizer

    config = ChatTemplateConfig(truncate_history_thinking=truncate)
    template = ChatTemplate.from_assets(str(NANO_ASSETS), config)
    fast = Tokenizer.from_file(str(NANO_ASSETS / "tokenizer.json"))
    encoder = ChatEncoder(template, fast, config=config)
    for messages in [MULTI_TURN_WITH_REASONING, *CHATS[:20]]:
        text = encoder.render(messages)
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        spans, pos = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            content, reasoning = m["content"], m.get("reasoning_content", "")
            if "</think>" in content:
                reasoning = content.split("</think>")[0].split("<think>")[-1].strip()
                content = content.split("</think>")[-1]
            if not reasoning:
                produced = f"<think></think>{content.strip()}"
            elif truncate and i < last_user:
                produced = f"<think></think>\n{content.strip()}"
            else:
                produced = f"<think>\n{reasoning}\n</think>\n{content.strip()}"
            start = text.index("<|im_start|>assistant\n" + produced + "<|im_end|>", pos)
            start += len("<|im_start|>assistant\n")
            pos = start + len(produced) + len("<|im_end|>")
            spans.append((start, pos))
        encoding = fast.encode(text, add_special_tokens=False)
        expected = [any(s <= a < e for s, e in spans) for a, _ in encoding.offsets]
        assert encoder.encode(messages).trained == expected


def test_generation_prompt_follows_enable_thinking(tokenizer_dir):
    user = [{"role": "user", "content": "Hi"}]
    for enable, opening in ((True, "<think>\n"), (False, "<think></think>")):
        config = ChatTemplateConfig(enable_thinking=enable)
        template = ChatTemplate.from_assets(tokenizer_dir, config)
        prompt = template.render(user, add_generation_prompt=True)
        assert (
            prompt
            == f"<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n{opening}"
        )


def test_generated_chats_are_deterministic_multi_turn_with_reasoning():
    a, b = generate_chats(50, 11), generate_chats(50, 11)
    assert a == b and a != generate_chats(50, 12)
    messages = [m for r in a for m in r["messages"]]
    assert any("reasoning_content" in m for m in messages)
    assert any("<think>" in m["content"] for m in messages)
    assert sum(len(r["messages"]) >= 5 for r in a) >= 10


def test_preview_marks_the_trained_text(capsys):
    from torchtitan_nemotron3.sft.preview import main

    toml = Path(__file__).resolve().parents[2] / "train_configs" / "debug_sft.toml"
    main(["--config_file", str(toml), "--n", "1"])
    out = capsys.readouterr().out
    assert "row 1 (line 1): 54 tokens, 23 trained" in out
    assert "<|im_start|>assistant\n[[<think>\n" in out and "<|im_end|>]]" in out


PLAIN_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + "
    "'<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_template_path_and_reasoning_inline(tokenizer_dir, hf_tokenizer, tmp_path):
    """A template that ignores ``reasoning_content`` (plain ChatML, from
    ``template.path``) would drop the reasoning; ``reasoning_inline`` writes it into
    the content as <think>...</think>, and it is trained."""
    from tokenizers import Tokenizer

    (tmp_path / "chatml.jinja").write_text(PLAIN_CHATML)
    fast = Tokenizer.from_file(f"{tokenizer_dir}/tokenizer.json")
    messages = MULTI_TURN_WITH_REASONING[:3]
    trained = {}
    for inline in (False, True):
        config = ChatTemplateConfig(
            path=str(tmp_path / "chatml.jinja"), reasoning_inline=inline
        )
        template = ChatTemplate.from_assets(tokenizer_dir, config)
        assert template.origin == str(tmp_path / "chatml.jinja")
        enc = ChatEncoder(template, fast, config=config).encode(messages)
        trained[inline] = _trained_pieces(hf_tokenizer, enc.tokens, enc.trained)
    assert trained == {
        False: ["Four.<|im_end|>"],
        True: ["<think>\n2 + 2 = 4.\n</think>\nFour.<|im_end|>"],
    }
