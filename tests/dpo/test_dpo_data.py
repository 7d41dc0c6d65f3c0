"""Preference rows → pairs → packed rows: both layouts TRL reads, every bad row
named, the reply-only labels of each side, both replies in one row, resume."""

import json

import pytest
import torch

from torchtitan_nemotron3.dpo.data import PAIR_KEY, SEGMENT_KEY, PreferenceDataset, PreferenceDataLoader
from torchtitan_nemotron3.dpo.pairs import PairColumns, to_pair
from torchtitan_nemotron3.sft.chat_data import ChatDataError
from torchtitan_nemotron3.sft.packing import IGNORE_INDEX

COLS = PairColumns()


def test_explicit_and_implicit_prompts_give_the_same_pair():
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    good = {"role": "assistant", "content": "Hello."}
    bad = {"role": "assistant", "content": "Go away."}
    explicit = to_pair({"prompt": prompt, "chosen": [good], "rejected": [bad]}, COLS, "f: row 1")
    implicit = to_pair({"chosen": prompt + [good], "rejected": prompt + [bad]}, COLS, "f: row 2")
    as_text = to_pair({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}, COLS, "r")
    assert explicit == implicit
    assert explicit.chosen == prompt + [good] and explicit.rejected == prompt + [bad]
    assert as_text.prompt == [{"role": "user", "content": "Hi?"}]
    assert as_text.chosen[-1] == good


@pytest.mark.parametrize(
    "row,match",
    [
        ({"prompt": "q", "chosen": "a"}, "no 'rejected' column"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen' must be a string"),
        (
            {"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
            "not an assistant one",
        ),
        (
            {
                "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "b"}],
            },
            "differ only in their last message",
        ),
        (
            {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
             "chosen": "a", "rejected": "b"},
            "must end with a user or tool message",
        ),
    ],
)
def test_bad_rows_are_named(row, match):
    with pytest.raises(ChatDataError, match=match) as err:
        to_pair(row, COLS, "pairs.jsonl: row 7 (line 7)")
    assert "pairs.jsonl: row 7" in str(err.value)


class _Tokenizer:
    """What the dataset needs of TorchTitan's HuggingFaceTokenizer."""

    def __init__(self, assets):
        from tokenizers import Tokenizer

        self.tokenizer_path = assets
        self.tokenizer = Tokenizer.from_file(f"{assets}/tokenizer.json")
        self.eos_id = self.tokenizer.token_to_id("<|im_end|>")


@pytest.fixture(scope="module")
def tokenizer():
    from torchtitan_nemotron3.sft.assets import ensure_debug_sft_assets

    return _Tokenizer(ensure_debug_sft_assets()[0])


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _rows(n):
    return [
        {"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"{2 * i} is it."}
        for i in range(n)
    ]


def _dataset(tmp_path, tokenizer, rows, seq_len=96, **kw):
    path = _write(tmp_path / "train.jsonl", rows)
    config = PreferenceDataLoader.Config(dataset_path=path, shuffle_seed=None, **kw)
    return PreferenceDataset(config, tokenizer=tokenizer, seq_len=seq_len)


def test_rows_hold_both_replies_with_reply_only_labels(tmp_path, tokenizer):
    ds = _dataset(tmp_path, tokenizer, _rows(6), infinite=False)
    tok = tokenizer.tokenizer
    seen = []
    for batch, labels in ds:
        seg, pair, pos = batch[SEGMENT_KEY], batch[PAIR_KEY], batch["positions"]
        assert batch["input"].shape == labels.shape == seg.shape == (96,)
        # labels exactly where a reply token is predicted; segments 0..2K-1 in order
        assert torch.equal(labels != IGNORE_INDEX, seg >= 0)
        ids = seg[seg >= 0].unique_consecutive().tolist()
        assert ids == list(range(len(ids))) and len(ids) % 2 == 0
        for k in range(len(ids) // 2):
            for side, word in ((0, "It is"), (1, " is it")):
                mask = seg == 2 * k + side
                text = tok.decode(labels[mask].tolist(), skip_special_tokens=False)
                assert word.strip() in text, text
                assert pair[mask].unique().numel() == 1
            seen.append(int(pair[seg == 2 * k][0]))
        # every document starts at position 0: the row's documents = 2 per pair + pad
        assert int((pos == 0).sum()) in (len(ids), len(ids) + 1)
    assert seen == list(range(6))  # every pair once, in file order


def test_resume_continues_with_the_same_rows(tmp_path, tokenizer):
    ds = _dataset(tmp_path, tokenizer, _rows(9))
    it = iter(ds)
    whole = [next(it) for _ in range(6)]
    ds2 = _dataset(tmp_path, tokenizer, _rows(9))
    it2 = iter(ds2)
    for _ in range(2):
        next(it2)
    state = ds2.state_dict()
    ds3 = _dataset(tmp_path, tokenizer, _rows(9))
    ds3.load_state_dict(state)
    it3 = iter(ds3)
    for want in whole[2:]:
        got = next(it3)
        assert torch.equal(got[1], want[1])
        for k in want[0]:
            assert torch.equal(got[0][k], want[0][k])


def test_a_pair_longer_than_a_row_is_dropped_and_counted(tmp_path, tokenizer):
    rows = _rows(3)
    rows[1]["chosen"] = "It is " + "very " * 80 + "long."
    ds = _dataset(tmp_path, tokenizer, rows, infinite=False)
    pairs = [int(b[PAIR_KEY][b[SEGMENT_KEY] == 2 * k][0]) for b, _ in ds
             for k in range(int(b[SEGMENT_KEY].max()) // 2 + 1)]
    assert pairs == [0, 2] and ds.dropped == 1
    truncated = _dataset(tmp_path, tokenizer, rows, infinite=False, overflow="truncate")
    assert sum(int(b[SEGMENT_KEY].max()) // 2 + 1 for b, _ in truncated) == 3
