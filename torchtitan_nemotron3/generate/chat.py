"""The prompt as the model saw text in training: through the tokenizer's chat template.

The template comes from the tokenizer directory (``chat_template`` in
tokenizer_config.json or ``chat_template.jinja``, which HF exports carry), or from a
file given explicitly; without one, ``use_chat_template=False`` feeds the raw text
after the tokenizer's BOS (the framing the pretraining dataloader gives a document).
Stopping: the tokenizer's EOS, the ``eos_token_id`` of generation_config.json, and
stop strings (ChatML's ``<|im_end|>`` when the rendered prompt uses it, so a model
fine-tuned on ChatML stops at the end of its turn even where that marker is not one
token).
"""

import json
import os

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
CHATML_END = "<|im_end|>"


def tokenizer_dir_or_none(checkpoint: str) -> str | None:
    """The checkpoint directory if it holds tokenizer files (an HF export does)."""
    if os.path.isdir(checkpoint) and any(
        os.path.isfile(os.path.join(checkpoint, f)) for f in TOKENIZER_FILES
    ):
        return checkpoint
    return None


def tokenizer_dir(checkpoint: str, tokenizer: str | None) -> str:
    """``tokenizer`` if given, else the checkpoint directory if it holds tokenizer
    files (an HF export does); else a one-line error saying what to pass."""
    if tokenizer is not None:
        if not os.path.isdir(tokenizer):
            raise FileNotFoundError(f"tokenizer directory {tokenizer} does not exist")
        return tokenizer
    if tokenizer_dir_or_none(checkpoint) is not None:
        return checkpoint
    raise FileNotFoundError(
        f"no tokenizer files in {checkpoint}: pass --tokenizer DIR (e.g. the "
        "hf_assets_path the model was trained with)"
    )


def load_tokenizer(path: str, chat_template_file: str | None = None):
    """transformers' tokenizer of ``path``, with the template of
    ``chat_template_file`` (a Jinja file) if given."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if chat_template_file is not None:
        if not os.path.isfile(chat_template_file):
            raise FileNotFoundError(
                f"chat template file {chat_template_file} does not exist"
            )
        with open(chat_template_file, encoding="utf-8") as f:
            tok.chat_template = f.read()
    return tok


def render_prompt(
    tok,
    prompt: str,
    *,
    use_chat_template: bool = True,
    system: str | None = None,
    template_kwargs: dict | None = None,
) -> tuple[list[int], str]:
    """``(token ids, text)`` of the prompt: one user turn (after ``system`` if given)
    and the assistant's generation prompt, or the raw text after BOS."""
    if not use_chat_template:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None:
            ids = [tok.bos_token_id, *ids]
        return ids, prompt
    if not tok.chat_template:
        raise ValueError(
            f"the tokenizer at {tok.name_or_path} has no chat template: pass "
            "--chat_template FILE (a Jinja template) or --no_chat_template (raw text)"
        )
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    from jinja2 import TemplateError

    try:
        text = tok.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=True,
            **(template_kwargs or {}),
        )
    except TemplateError as e:
        raise ValueError(
            f"the chat template of {tok.name_or_path} failed: {type(e).__name__}: {e}"
        ) from None
    # The template writes its own special tokens (BOS included, if it has one).
    return tok(text, add_special_tokens=False)["input_ids"], text


def stop_token_ids(tok, *dirs: str) -> set[int]:
    """EOS of the tokenizer and of generation_config.json in any of ``dirs``."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for d in dirs:
        path = os.path.join(d, "generation_config.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return ids


def stop_strings(prompt_text: str, extra: list[str] | None = None) -> list[str]:
    """``extra``, plus ChatML's end of turn when the prompt is ChatML."""
    out = list(extra or [])
    if CHATML_END in prompt_text and CHATML_END not in out:
        out.append(CHATML_END)
    return out
