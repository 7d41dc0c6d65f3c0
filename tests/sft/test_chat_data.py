"""Chat sources and bad data: JSONL, Parquet, directories, column mapping; a bad row
stops with one message naming the file, the row and the problem."""

import json
import re
import shutil

import pytest
import torch

from torchtitan_nemotron3.sft import (
    ChatColumns,
    ChatDataError,
    ChatSFTDataLoader,
    ChatSource,
)
from torchtitan_nemotron3.sft.assets import ensure_debug_sft_assets, generate_chats

GOOD = {
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
}


@pytest.fixture(scope="module")
def tokenizer():
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    return HuggingFaceTokenizer(tokenizer_path=ensure_debug_sft_assets()[0])


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _loader(tokenizer, path, *, seq_len=128, batch=2, rank=0, world=1, **kw):
    config = ChatSFTDataLoader.Config(dataset_path=str(path), infinite=False, **kw)
    return ChatSFTDataLoader(
        config, dp_world_size=world, dp_rank=rank, tokenizer=tokenizer,
        seq_len=seq_len, local_batch_size=batch,
    )  # fmt: skip


def _first_error(tokenizer, path, **kw) -> str:
    with pytest.raises(ChatDataError) as e:
        next(iter(_loader(tokenizer, path, shuffle_seed=None, **kw)))
    return str(e.value)


@pytest.mark.parametrize(
    "bad, problem",
    [
        (
            {"conversation": GOOD["messages"]},
            r"no 'messages' column \(the row has: conversation\)",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "narrator", "content": "x"},
                ]
            },
            r"message 2: unknown role 'narrator'",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "  "},
                ]
            },
            r"message 2: empty assistant turn",
        ),
        ({"messages": [{"role": "user", "content": "Hi"}]}, r"no assistant message"),
    ],
)
def test_bad_row_names_file_row_and_problem(tokenizer, tmp_path, bad, problem):
    path = _write_jsonl(tmp_path / "chats.jsonl", [GOOD, GOOD, bad, GOOD])
    message = _first_error(tokenizer, path)
    assert re.search(
        rf"^{re.escape(str(path))}: row 3 \(line 3\): {problem}", message
    ), message


def test_bad_row_in_parquet(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        GOOD,
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "robot", "content": "x"},
            ]
        },
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chats.parquet")
    message = _first_error(tokenizer, tmp_path / "chats.parquet")
    assert message.startswith(
        f"{tmp_path / 'chats.parquet'}: row 2: message 2: unknown role 'robot'"
    )


def test_template_missing(tmp_path):
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    assets = tmp_path / "tok"
    shutil.copytree(ensure_debug_sft_assets()[0], assets)
    (assets / "chat_template.jinja").unlink()
    tok = HuggingFaceTokenizer(tokenizer_path=str(assets))
    path = _write_jsonl(tmp_path / "chats.jsonl", [GOOD])
    message = _first_error(tok, path)
    assert (
        message.startswith(f"{assets}: no chat template") and "template.path" in message
    )


def test_missing_file_and_unloadable_file(tokenizer, tmp_path):
    assert (
        _first_error(tokenizer, tmp_path / "nope.jsonl")
        == f"{tmp_path / 'nope.jsonl'}: no such file or directory"
    )
    _write_jsonl(tmp_path / "broken.jsonl", [GOOD])
    with open(tmp_path / "broken.jsonl", "a") as f:
        f.write('\n{"messages": [\n')
    assert _first_error(tokenizer, tmp_path / "broken.jsonl").startswith(
        f"{tmp_path / 'broken.jsonl'}: row 2 (line 3): invalid JSON"
    )


def test_parquet_jsonl_and_sharegpt_columns_give_the_same_rows(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = generate_chats(12, 3)
    _write_jsonl(tmp_path / "a.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    sharegpt = [
        {"conversations": [
            {"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"],
             **({"reasoning_content": m["reasoning_content"]} if "reasoning_content" in m else {})}
            for m in r["messages"]
        ]}
        for r in rows
    ]  # fmt: skip
    _write_jsonl(tmp_path / "s.jsonl", sharegpt)

    def batches(path, **kw):
        return [
            (x["input"], x["positions"], y) for x, y in _loader(tokenizer, path, **kw)
        ]

    reference = batches(tmp_path / "a.jsonl")
    assert len(reference) >= 2
    for other in (
        batches(tmp_path / "a.parquet"),
        batches(
            tmp_path / "s.jsonl",
            columns=ChatColumns(
                messages="conversations", role_key="from", content_key="value"
            ),
        ),
    ):
        assert len(other) == len(reference)
        for a, b in zip(reference, other):
            assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_prompt_response_columns(tokenizer, tmp_path):
    rows = [{"q": "What is one plus one?", "think": "1 + 1 = 2.", "a": "Two."}]
    path = _write_jsonl(tmp_path / "qa.jsonl", rows)

    _, y = next(iter(_loader(
        tokenizer, path, batch=1, columns=ChatColumns(prompt="q", response="a", reasoning="think"),
    )))  # fmt: skip
    trained = tokenizer.decode(
        [t for t in y[0].tolist() if t != -100], skip_special_tokens=False
    )
    assert trained == "<think>\n1 + 1 = 2.\n</think>\nTwo.<|im_end|>"


def test_directory_split_and_ranks_partition_the_rows(tokenizer, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Say {i}."},
                {"role": "assistant", "content": f"{i}"},
            ]
        }
        for i in range(10)
    ]
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "validation.jsonl", rows[:2])
    seen = []
    for rank in range(2):
        src = ChatSource(str(tmp_path), split="train", dp_rank=rank, dp_world_size=2)
        seen.append([where for where, _ in src.rows()])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(
        f"{tmp_path / 'train.jsonl'}: row {i} (line {i})" for i in range(1, 11)
    )
    val = ChatSource(str(tmp_path), split="validation")
    assert len(list(val.rows())) == 2


def test_hub_dataset_is_streamed_per_rank_and_resumes(monkeypatch):
    """A hub id goes to ``datasets.load_dataset(..., streaming=True)``; rank r reads
    stream rows r, r + world, ...; ``rows(start)`` skips what this rank has read."""
    import datasets

    rows = [{"i": i} for i in range(9)]
    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return datasets.Dataset.from_list(rows).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    src = ChatSource("org/chats", split="train", dp_rank=1, dp_world_size=2)
    assert calls == [("org/chats", None, "train", True)]
    got = list(src.rows())
    assert [r["i"] for _, r in got] == [1, 3, 5, 7]
    assert got[0][0] == "org/chats [train]: row 2"
    assert [r["i"] for _, r in src.rows(start=2)] == [5, 7]


def test_hub_dataset_that_cannot_load(monkeypatch):
    import datasets

    def fail(*args, **kwargs):
        raise ConnectionError("offline and not cached")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(
        ChatDataError,
        match=r"^org/chats \(split 'train'\): cannot load this dataset: offline",
    ):
        ChatSource("org/chats")


def test_dataloader_workers_read_disjoint_rows(tokenizer, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Say {i}."},
                {"role": "assistant", "content": f"{i}"},
            ]
        }
        for i in range(8)
    ]
    path = _write_jsonl(tmp_path / "c.jsonl", rows)
    seen = []
    for _, y in _loader(tokenizer, path, batch=1, packing=False, num_workers=2):
        seen.append(tokenizer.decode([t for t in y[0].tolist() if t != -100]))
    assert sorted(seen) == [str(i) for i in range(8)]  # each row once, specials dropped


def test_every_conversation_dropped_is_an_error(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", [GOOD] * 3)
    message = _first_error(tokenizer, path, seq_len=4)
    assert message.startswith(f"{path}: rank 0 has no usable conversation (3 rows")
    assert "longer than seq_len" in message


def test_directory_without_the_split(tmp_path):
    _write_jsonl(tmp_path / "part-0.jsonl", [GOOD])
    assert len(list(ChatSource(str(tmp_path)).rows())) == 1  # all files: "train"
    with pytest.raises(
        ChatDataError,
        match=r"no file whose name starts with split 'validation' \(files: part-0.jsonl\)",
    ):
        ChatSource(str(tmp_path), split="validation")
