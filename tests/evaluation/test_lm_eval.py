"""Our lm-eval model against lm-eval's own ``hf`` model (transformers'
NemotronHForCausalLM) on our HF export of the same random weights, through lm-eval's
evaluator on two local tasks: per-request loglikelihoods within 1e-4 (fp32), the same
accuracy, the same greedy generations (cut at the same stop strings); packed rows give
what one request per row gives."""

import math

import lm_eval
import pytest
import torch
from lm_eval_tasks import write_tasks
from nemotron_testing import build_model, randomize_

from torchtitan_nemotron3 import flavor_args, save_pretrained
from torchtitan_nemotron3.evaluate import NemotronLM, pack_rows, score_requests
from torchtitan_nemotron3.train.assets import ensure_debug_assets

TASKS = ["tiny_mc", "tiny_gen"]


def _args():
    # transformers' torch path floors dt at time_step_min: make ours say so too.
    return flavor_args("debugmodel").replace(time_step_limit=(1e-3, float("inf")))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer, _ = ensure_debug_assets()
    model = build_model(_args(), seed=0, kernel_backend="torch").eval()
    randomize_(model, seed=5)
    save_pretrained(model, root / "hf", assets_dir=tokenizer)
    tasks = write_tasks(root)
    return {"root": root, "tasks": tasks, "model": model}


def evaluate(setup, model, model_args):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(setup["tasks"])),
        log_samples=True,
        device="cpu",
    )


@pytest.fixture(scope="module")
def theirs(setup):
    return evaluate(
        setup, "hf", {"pretrained": str(setup["root"] / "hf"), "dtype": "float32"}
    )


def per_request(result, task):
    """(doc_id, [(logprob, is_greedy) or text per request]) in doc order."""
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0] for r in s["resps"]] for s in samples]


def assert_same(ours, theirs):
    mc_ours, mc_theirs = per_request(ours, "tiny_mc"), per_request(theirs, "tiny_mc")
    assert len(mc_ours) == len(mc_theirs) == 12
    diff = max(
        abs(a[0] - b[0])
        for doc_a, doc_b in zip(mc_ours, mc_theirs, strict=True)
        for a, b in zip(doc_a, doc_b, strict=True)
    )
    print(f"max |loglikelihood ours - hf| = {diff:.2e}")
    assert diff <= 1e-4
    for doc_a, doc_b in zip(mc_ours, mc_theirs, strict=True):
        assert [a[1] for a in doc_a] == [b[1] for b in doc_b]
    acc = ours["results"]["tiny_mc"]["acc,none"]
    assert acc == theirs["results"]["tiny_mc"]["acc,none"]
    gen_ours, gen_theirs = (
        per_request(ours, "tiny_gen"),
        per_request(theirs, "tiny_gen"),
    )
    assert gen_ours == gen_theirs
    # the stop string "2" cut some generations short (so stopping was exercised)
    assert any(len(g[0]) < 20 for g in gen_ours), gen_ours
    assert ours["results"]["tiny_gen"] == theirs["results"]["tiny_gen"]


def test_packed_matches_lm_eval_hf(setup, theirs):
    ours = evaluate(
        setup,
        "nemotron3",
        {
            "pretrained": str(setup["root"] / "hf"),
            "batch_size": 4,
            "kernel_backend": "torch",
        },
    )
    assert_same(ours, theirs)


def test_unpacked_built_model_matches(setup, theirs):
    """One request per row, and a built model handed over from Python."""
    lm = NemotronLM(
        pretrained=setup["model"], tokenizer=str(setup["root"] / "hf"), pack=False
    )
    assert_same(evaluate(setup, lm, None), theirs)


def test_packing_is_exact(setup):
    """Requests of random lengths: packed many to a row (2 rows of 4) or one per row
    (batch 1, no positions at all), the same log-probs and greedy flags."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(3, 40, (13,), generator=g).tolist()
    inputs = [torch.randint(0, 2048, (n,), generator=g).tolist() for n in lengths]
    targets = [x[-1 - i % 3 :][:n] for i, (x, n) in enumerate(zip(inputs, lengths))]
    targets = [t[1:] + [7] for t in targets]  # the next tokens, one past the input
    rows = pack_rows(lengths, 64)
    assert len(rows) < len(lengths) / 2
    packed = score_requests(
        setup["model"], inputs, targets, row_tokens=64, rows_per_batch=4
    )
    alone = score_requests(
        setup["model"], inputs, targets, row_tokens=64, pack=False, rows_per_batch=1
    )
    for (a, ga), (b, gb) in zip(packed, alone, strict=True):
        assert math.isfinite(a) and abs(a - b) <= 1e-5, (a, b)
        assert ga == gb


def _cli():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("evaluate_cli", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "no_such_task"], "--tasks: no_such_task: not an lm-eval task"),
        (
            ["--perplexity", "{root}/missing.jsonl"],
            "perplexity file {root}/missing.jsonl does not exist",
        ),
        (
            ["--tasks", "tiny_mc", "--checkpoint", "{root}/nope"],
            "checkpoint {root}/nope does not exist",
        ),
        (["--tasks", "tiny_mc"], "give --checkpoint DIR or --config_file JOB.toml"),
        (["--tasks", "tiny_mc", "--perplexity", "x"], "pass --tasks or --perplexity"),
    ],
)
def test_cli_errors(setup, capsys, argv, message):
    root = str(setup["root"])
    argv = [a.format(root=root) for a in argv]
    if "--checkpoint" not in argv and "give" not in message:
        argv += ["--checkpoint", f"{root}/hf"]
    argv += ["--include_path", str(setup["tasks"])]
    assert _cli().main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.format(root=root) in err, err


def test_perplexity_cli(setup, capsys):
    """``evaluate.py --perplexity``: bits per token and per byte of a JSONL set equal
    the definition computed with transformers' model on the export (each document
    after BOS, every token predicted once)."""
    import importlib.util
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    script = Path(__file__).resolve().parents[2] / "scripts" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("evaluate_cli", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    docs = ["Ada went to the market.", "Three red apples, and a pear for her mother."]
    data = setup["root"] / "ppl.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    hf = str(setup["root"] / "hf")
    out = setup["root"] / "ppl"
    rc = cli.main(
        ["--checkpoint", hf, "--perplexity", str(data), "--output_path", str(out)]
    )
    assert rc == 0, capsys.readouterr().err
    got = json.loads((out / "perplexity.json").read_text())

    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    nll, n_tokens = 0.0, 0
    for d in docs:
        ids = tok.encode(d)
        x = torch.tensor([[tok.bos_token_id, *ids[:-1]]])
        with torch.no_grad():
            logp = model(x).logits[0].float().log_softmax(-1)
        nll -= logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
        n_tokens += len(ids)
    n_bytes = sum(len(d.encode()) for d in docs)
    assert got["tokens"] == n_tokens and got["bytes"] == n_bytes
    assert abs(got["bits_per_token"] - nll / n_tokens / math.log(2)) <= 1e-5
    assert abs(got["bits_per_byte"] - nll / n_bytes / math.log(2)) <= 1e-5
    assert "bits_per_byte" in capsys.readouterr().out

    # the same documents pre-tokenized (a Megatron indexed dataset): the same
    # tokens scored, so the same bits per token; bytes of the decoded text
    import numpy as np

    from torchtitan_nemotron3.data.indexed import IndexedDatasetWriter

    prefix = str(setup["root"] / "ppl_tokens")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in docs:
            w.add_document(tok.encode(d))
    rc = cli.main(
        ["--checkpoint", hf, "--perplexity", prefix, "--output_path", str(out)]
    )
    assert rc == 0, capsys.readouterr().err
    pre = json.loads((out / "perplexity.json").read_text())
    assert pre["tokens"] == n_tokens
    assert abs(pre["bits_per_token"] - got["bits_per_token"]) <= 1e-6
    decoded = sum(
        len(tok.decode(tok.encode(d), skip_special_tokens=True).encode()) for d in docs
    )
    assert abs(pre["bits_per_byte"] - nll / decoded / math.log(2)) <= 1e-5


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_template_as_lm_eval_hf(setup):
    """``apply_chat_template``: the prompts lm-eval renders through our model's
    template are the ones it renders through the hf model's (same tokenizer and
    template), and so are the loglikelihoods and generations."""
    from transformers import AutoTokenizer

    hf = str(setup["root"] / "hf")
    template = setup["root"] / "chatml.jinja"
    template.write_text(CHATML)
    tok = AutoTokenizer.from_pretrained(hf)
    tok.chat_template = CHATML

    def run(model, model_args):
        from lm_eval.tasks import TaskManager

        return lm_eval.simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=TASKS,
            task_manager=TaskManager(include_path=str(setup["tasks"])),
            log_samples=True,
            apply_chat_template=True,
            limit=4,
            device="cpu",
        )

    ours = run(
        NemotronLM(
            pretrained=setup["model"], tokenizer=hf, chat_template_file=str(template)
        ),
        None,
    )
    theirs = run("hf", {"pretrained": hf, "tokenizer": tok, "dtype": "float32"})
    for task in TASKS:
        a = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert [s["arguments"] for s in a] == [s["arguments"] for s in b]
        assert all("<|im_start|>assistant" in str(s["arguments"]) for s in a)
    mc = [
        [r[0] for r in s["resps"]]
        for s in sorted(ours["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    ]
    mc_ref = [
        [r[0] for r in s["resps"]]
        for s in sorted(theirs["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    ]
    diff = max(abs(x[0] - y[0]) for da, db in zip(mc, mc_ref) for x, y in zip(da, db))
    assert diff <= 1e-4, diff
    assert per_request(ours, "tiny_gen") == per_request(theirs, "tiny_gen")
