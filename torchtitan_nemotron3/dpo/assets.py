"""Offline preference pairs for the debug DPO run, from the debug SFT chats.

A pair is a generated conversation up to its last user turn (the prompt), its last
assistant reply (chosen), and the same reply with its answer's words in reverse
order (rejected; the reasoning is the same in both): a preference a small model can
learn from a few hundred pairs, so the run shows the margin and accuracy moving.
Written once next to the SFT assets (``build_once``: atomic, shared by ranks).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..sft.assets import ensure_debug_sft_assets, generate_chats
from ..train.assets import build_once, default_assets_root

DPO_ASSETS_VERSION = 1
NUM_TRAIN, NUM_VALIDATION = 1000, 100
TRAIN_SEED, VALIDATION_SEED = 1357, 2468


def _reversed_words(text: str) -> str:
    return " ".join(reversed(text.split()))


def generate_pairs(num: int, seed: int) -> list[dict]:
    """``num`` rows ``{"prompt": [...], "chosen": [msg], "rejected": [msg]}``."""
    rows = []
    for chat in generate_chats(num, seed):
        *prompt, reply = chat["messages"]
        content = reply["content"]
        head, sep, answer = content.rpartition("</think>\n")
        rejected = dict(reply, content=f"{head}{sep}{_reversed_words(answer)}")
        rows.append({"prompt": prompt, "chosen": [reply], "rejected": [rejected]})
    return rows


def _write(out: Path) -> None:
    for name, num, seed in (
        ("train", NUM_TRAIN, TRAIN_SEED),
        ("validation", NUM_VALIDATION, VALIDATION_SEED),
    ):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in generate_pairs(num, seed):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def ensure_debug_dpo_assets(root: str | os.PathLike | None = None) -> tuple[str, str]:
    """``(tokenizer_dir, pairs_dir)``: the debug SFT tokenizer (chat template
    included) and train/validation.jsonl of pairs, generated once."""
    tokenizer_dir, _ = ensure_debug_sft_assets(root)
    root = Path(root) if root is not None else default_assets_root()
    name = f"dpo-v{DPO_ASSETS_VERSION}-pairs{NUM_TRAIN}-seed{TRAIN_SEED}"
    return tokenizer_dir, str(build_once(root, name, _write))
