"""``scripts/evaluate.py`` from the job file alone on a checkpoint written by an
expert-parallel run (EP=2 over 2 gloo ranks, DCP shards): the job gives the
architecture, tokenizer and newest checkpoint. The same numbers as lm-eval's ``hf``
model on our HF export of that checkpoint; results and samples written where
lm-eval writes them."""

import json
import sys
from pathlib import Path

import pytest
from lm_eval_tasks import write_tasks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from _harness import run_training, write_fp32_debug_toml

ROOT = Path(__file__).resolve().parents[2]


def _samples(folder: Path, task: str) -> list:
    """Per document, each request's response as lm-eval wrote it (strings: a
    loglikelihood is ``[logprob, is_greedy]``)."""
    (path,) = folder.rglob(f"samples_{task}_*.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [[r[0] for r in s["resps"]] for s in sorted(rows, key=lambda s: s["doc_id"])]


@pytest.mark.integration
def test_ep2_checkpoint_from_job_file(tmp_path, monkeypatch):
    job = write_fp32_debug_toml(tmp_path / "job.toml")
    dump = tmp_path / "dump"
    run_training(
        job,
        2,
        ["--parallelism.expert_parallel_degree", "2", "--training.steps", "1",
         "--checkpoint.enable", "--checkpoint.interval", "1", "--dump_folder", str(dump)],
        tmp_path / "train",
    )  # fmt: skip
    step = dump / "checkpoint" / "step-1"
    assert (step / ".metadata").is_file()
    tasks = write_tasks(tmp_path)

    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "evaluate_cli", ROOT / "scripts" / "evaluate.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    common = [
        "--tasks",
        "tiny_mc,tiny_gen",
        "--include_path",
        str(tasks),
        "--log_samples",
    ]
    rc = cli.main(
        [*common, "--config_file", str(job), "--batch_size", "4",
         "--output_path", str(tmp_path / "ours"), "--dump_folder", str(dump)]
    )  # fmt: skip
    assert rc == 0

    # the reference: lm-eval's hf model on our HF export of the same checkpoint
    import lm_eval
    from lm_eval.tasks import TaskManager

    from torchtitan_nemotron3.hf.dcp_convert import dcp_to_hf
    from torchtitan_nemotron3.job import load_job, model_args, tokenizer_dir

    config = load_job(job, ["--dump_folder", str(dump)])
    dcp_to_hf(
        step, tmp_path / "hf", model_args(config), assets_dir=tokenizer_dir(config)
    )
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tmp_path / "hf"), "dtype": "float32"},
        tasks=["tiny_mc", "tiny_gen"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
        device="cpu",
    )
    mc_ours = _samples(tmp_path / "ours", "tiny_mc")
    mc_theirs = [
        [r[0] for r in s["resps"]]
        for s in sorted(theirs["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    ]
    diff = max(
        abs(float(a[0]) - b[0])
        for da, db in zip(mc_ours, mc_theirs, strict=True)
        for a, b in zip(da, db, strict=True)
    )
    print(f"EP=2 checkpoint: max |loglikelihood ours - hf| = {diff:.2e}")
    assert diff <= 1e-4
    greedy = [[a[1] for a in d] for d in mc_ours]
    assert greedy == [[str(b[1]) for b in d] for d in mc_theirs]
    gen_theirs = [
        [r[0] for r in s["resps"]]
        for s in sorted(theirs["samples"]["tiny_gen"], key=lambda s: s["doc_id"])
    ]
    assert _samples(tmp_path / "ours", "tiny_gen") == gen_theirs
    (results,) = (tmp_path / "ours").rglob("results_*.json")
    ours = json.loads(results.read_text())["results"]
    for task in ("tiny_mc", "tiny_gen"):
        for key, value in theirs["results"][task].items():
            if key != "alias" and not key.endswith("stderr,none"):
                assert ours[task][key] == value, (task, key)
