#!/usr/bin/env python
"""Evaluate a NemotronH checkpoint on lm-evaluation-harness tasks, or measure its
validation perplexity, through our model (packed loglikelihood rows, batched
incremental decoding).

The checkpoint is a DCP checkpoint (any parallel layout's), a hub-format directory or
a Hub repo id. With ``--config_file`` (the job file the run was started from) the
flavor, tokenizer and chat template come from the job, and the newest complete
checkpoint of its dump folder is used unless ``--checkpoint`` names one::

    python scripts/evaluate.py --config_file train_configs/debug.toml \\
        --tasks lambada_openai,hellaswag --batch_size 8 --output_path out/eval

    python scripts/evaluate.py --config_file train_configs/debug_sft.toml \\
        --tasks gsm8k --apply_chat_template --limit 50 --log_samples --output_path out/eval

    python scripts/evaluate.py --checkpoint nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 \\
        --tasks arc_easy --device cuda --dtype bfloat16 --batch_size 16

    python scripts/evaluate.py --config_file train_configs/debug.toml \\
        --perplexity held_out.jsonl

Task flags are lm-eval's own (``--tasks``, ``--include_path`` for local task YAMLs,
``--num_fewshot``, ``--limit``, ``--output_path``, ``--log_samples``,
``--apply_chat_template``, ``--gen_kwargs``); results are written as ``lm_eval``
writes them (``results_<date>.json`` and ``samples_<task>_<date>.jsonl`` under
``--output_path``). ``--batch_size`` is rows per forward for loglikelihood (each row
packs requests up to ``--row_tokens``) and prompts per batch for generation.
``--perplexity FILE...`` (``.jsonl`` with a ``"text"`` field per line, plain text
files, one document each, or a pre-tokenized Megatron indexed dataset PREFIX, as
scripts/prepare_data.py writes it; ``--limit N``: its first N documents) prints bits
per token and per byte instead.
Other ``--section.key value`` arguments override the job file, as for run_train.sh.
"""

import argparse
import json
import os
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="evaluate.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    src = p.add_argument_group("model")
    src.add_argument("--config_file", help="the run's job file (train_configs/*.toml)")
    src.add_argument(
        "--checkpoint",
        help="DCP dir, hub-format dir or Hub repo id (default: the job's newest)",
    )
    arch = src.add_mutually_exclusive_group()
    arch.add_argument("--flavor", help="architecture of a DCP checkpoint")
    arch.add_argument("--config_json", help="HF config.json of a DCP checkpoint")
    src.add_argument("--tokenizer", help="tokenizer directory (default: the job's)")
    src.add_argument("--chat_template", help="a Jinja chat template file")
    src.add_argument("--dtype", help="float32, bfloat16 (default: the stored one)")
    src.add_argument("--device", default="cpu")
    src.add_argument("--kernel_backend", default="auto")
    ev = p.add_argument_group("lm-eval")
    ev.add_argument("--tasks", help="comma-separated lm-eval task names")
    ev.add_argument("--include_path", help="directory of extra task YAMLs")
    ev.add_argument("--num_fewshot", type=int)
    ev.add_argument("--batch_size", type=int, default=1)
    ev.add_argument("--limit", type=float, help="documents per task (<1: a fraction)")
    ev.add_argument("--output_path")
    ev.add_argument("--log_samples", action="store_true")
    ev.add_argument(
        "--apply_chat_template",
        nargs="?",
        const=True,
        default=False,
        help="format prompts with the tokenizer's chat template (optionally its name)",
    )
    ev.add_argument(
        "--fewshot_as_multiturn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="few-shot examples as chat turns (default: with --apply_chat_template)",
    )
    ev.add_argument(
        "--gen_kwargs", help="e.g. temperature=0.6,top_p=0.95,do_sample=True"
    )
    ev.add_argument("--seed", type=int, default=0)
    ours = p.add_argument_group("ours")
    ours.add_argument(
        "--max_length", type=int, help="context length (default: config.json's)"
    )
    ours.add_argument("--row_tokens", type=int, help="tokens per packed row")
    ours.add_argument("--no_pack", action="store_true", help="one request per row")
    ours.add_argument("--perplexity", nargs="+", metavar="FILE|PREFIX")
    return p


def _resolve(opts, overrides: list[str]) -> dict:
    """Checkpoint, architecture and tokenizer for ``NemotronLM``: the explicit flags,
    else the job file's (``torchtitan_nemotron3.job``)."""
    if overrides and not (opts.config_file and overrides[0].startswith("--")):
        raise ValueError(f"unrecognized arguments: {' '.join(overrides)}")
    if not (opts.checkpoint or opts.config_file):
        raise ValueError("give --checkpoint DIR or --config_file JOB.toml")
    kw = {
        "pretrained": opts.checkpoint,
        "tokenizer": opts.tokenizer,
        "flavor": opts.flavor,
        "config_json": opts.config_json,
        "chat_template_file": opts.chat_template,
    }
    if opts.config_file:
        from torchtitan_nemotron3 import job as job_file
        from torchtitan_nemotron3.generate.chat import tokenizer_dir_or_none
        from torchtitan_nemotron3.generate.checkpoint import resolve_checkpoint

        job = job_file.load_job(opts.config_file, overrides)
        if opts.checkpoint is None:
            kw["pretrained"] = job_file.resolve_checkpoint(job, None)
            print(f"checkpoint: {kw['pretrained']}", file=sys.stderr)
        if not (opts.flavor or opts.config_json):
            kw["args"] = job_file.model_args(job)
        if opts.tokenizer is None:
            own = tokenizer_dir_or_none(resolve_checkpoint(kw["pretrained"]))
            kw["tokenizer"] = own or job_file.tokenizer_dir(job)
    return kw


def build_lm(opts, overrides: list[str] = ()):
    from torchtitan_nemotron3.evaluate import NemotronLM

    return NemotronLM(
        **_resolve(opts, list(overrides)),
        dtype=opts.dtype,
        device=opts.device,
        batch_size=opts.batch_size,
        max_length=opts.max_length,
        row_tokens=opts.row_tokens,
        pack=not opts.no_pack,
        kernel_backend=opts.kernel_backend,
        seed=opts.seed,
    )


def task_manager(opts):
    """lm-eval's task index (with ``--include_path``) and the ``--tasks`` it names,
    globs expanded (as lm-eval's CLI does); checked before the model is loaded."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=opts.include_path)
    tasks, unknown = [], []
    for name in opts.tasks.split(","):
        found = [name] if os.path.isfile(name) else manager.match_tasks([name])
        tasks += found
        if not found:
            unknown.append(name)
    if unknown:
        where = f" (nor in {opts.include_path})" if opts.include_path else ""
        raise ValueError(
            f"--tasks: {', '.join(unknown)}: not an lm-eval task, group or tag{where}"
        )
    return manager, tasks


def run_tasks(opts, lm, manager, tasks) -> dict:
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import make_table

    tracker = (
        EvaluationTracker(output_path=opts.output_path) if opts.output_path else None
    )
    multiturn = (
        bool(opts.apply_chat_template)
        if opts.fewshot_as_multiturn is None
        else opts.fewshot_as_multiturn
    )
    results = lm_eval.simple_evaluate(
        model=lm,
        model_args=lm.model_args,
        tasks=tasks,
        num_fewshot=opts.num_fewshot,
        limit=opts.limit,
        log_samples=opts.log_samples,
        evaluation_tracker=tracker,
        apply_chat_template=opts.apply_chat_template,
        fewshot_as_multiturn=multiturn,
        gen_kwargs=opts.gen_kwargs,
        task_manager=manager,
        random_seed=opts.seed,
    )
    samples = results.pop("samples", None) if opts.log_samples else None
    if tracker is not None:
        tracker.save_results_aggregated(results=results, samples=samples)
        if samples is not None:
            for task in results["configs"]:
                tracker.save_results_samples(task_name=task, samples=samples[task])
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    return results


def run_perplexity(opts, lm) -> dict:
    from torchtitan_nemotron3.evaluate.perplexity import perplexity

    limit = None if opts.limit is None else int(opts.limit)
    result = perplexity(lm, opts.perplexity, limit)
    for key, value in result.items():
        print(
            f"{key:>18}  {value:.6g}"
            if isinstance(value, float)
            else f"{key:>18}  {value}"
        )
    if opts.output_path:
        os.makedirs(opts.output_path, exist_ok=True)
        path = os.path.join(opts.output_path, "perplexity.json")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, path)
    return result


def main(argv: list[str] | None = None) -> int:
    opts, overrides = _parser().parse_known_args(argv)
    if bool(opts.tasks) == bool(opts.perplexity):
        print(
            "evaluate.py: error: pass --tasks or --perplexity (one of them)",
            file=sys.stderr,
        )
        return 2
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print(
            'evaluate.py: error: lm-eval is not installed: pip install -e ".[eval]"',
            file=sys.stderr,
        )
        return 1
    try:
        manager, tasks = task_manager(opts) if opts.tasks else (None, None)
        lm = build_lm(opts, overrides)
        if opts.perplexity:
            run_perplexity(opts, lm)
        else:
            run_tasks(opts, lm, manager, tasks)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
