"""Two local lm-eval tasks over JSONL written by the test (no network): a
multiple-choice task and a generation task with stop strings."""

import json
from pathlib import Path

WORDS = [
    "Ada",
    "went",
    "to",
    "the",
    "market",
    "and",
    "bought",
    "three",
    "red",
    "apples",
    "for",
    "her",
    "mother",
]


def _mc_docs(n: int) -> list[dict]:
    docs = []
    for i in range(n):
        start = i % 5
        docs.append(
            {
                "question": " ".join(WORDS[start : start + 3 + i % 4]),
                "choices": [
                    " " + WORDS[(start + k + i) % len(WORDS)] for k in range(3 + i % 2)
                ],
                "answer": i % 3,
            }
        )
    return docs


def _gen_docs(n: int) -> list[dict]:
    return [
        {"prompt": " ".join(WORDS[i % 6 : i % 6 + 2 + i % 5]), "target": WORDS[i % 7]}
        for i in range(n)
    ]


def write_tasks(root: Path, n_mc: int = 12, n_gen: int = 6) -> Path:
    """``root/tasks``: tiny_mc.yaml, tiny_gen.yaml and their JSONL."""
    tasks = Path(root) / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    for name, docs in (("mc", _mc_docs(n_mc)), ("gen", _gen_docs(n_gen))):
        with open(tasks / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
    (tasks / "tiny_mc.yaml").write_text(
        f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
    )
    (tasks / "tiny_gen.yaml").write_text(
        f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / "gen.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n", "2"]
  max_gen_toks: 10
  do_sample: false
metric_list:
  - metric: exact_match
"""
    )
    return tasks
