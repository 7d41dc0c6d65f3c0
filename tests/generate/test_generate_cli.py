"""``scripts/generate.py`` end to end on a tiny checkpoint: a random debug model saved
as an HF export (with the offline debug tokenizer) and as a DCP checkpoint; the chat
template path (a ChatML template file: the debug tokenizer has none) and the raw path;
one-line errors for bad arguments."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp
from nemotron_testing import build_model

from torchtitan_nemotron3 import flavor_args, save_pretrained
from torchtitan_nemotron3.generate.text_stream import TextStream
from torchtitan_nemotron3.train.assets import ensure_debug_assets

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "generate.py"
_spec = importlib.util.spec_from_file_location("generate_script", SCRIPT)
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    tokenizer, _ = ensure_debug_assets()
    model = build_model(flavor_args("debugmodel"), seed=0)
    save_pretrained(model, root / "hf", assets_dir=tokenizer)
    dcp.save(model.state_dict(), checkpoint_id=str(root / "dcp"), no_dist=True)
    (root / "chatml.jinja").write_text(CHATML)
    return {"root": root, "tokenizer": tokenizer}


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_hf_raw_prompt_greedy(ckpt, capsys):
    argv = [
        "--checkpoint",
        ckpt["root"] / "hf",
        "--prompt",
        "Ada went to the market",
        "--no_chat_template",
        "--greedy",
        "--max_new_tokens",
        12,
    ]
    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    assert out.strip(), "no text printed"
    assert "tokens/s" in err and "11 decode steps" in err
    assert run(capsys, *argv)[1] == out  # greedy: the same text again

    # the DCP checkpoint of the same weights gives the same text
    rc, dcp_out, err = run(
        capsys,
        "--checkpoint",
        ckpt["root"] / "dcp",
        "--flavor",
        "debugmodel",
        "--tokenizer",
        ckpt["tokenizer"],
        "--prompt",
        "Ada went to the market",
        "--no_chat_template",
        "--greedy",
        "--max_new_tokens",
        12,
    )
    assert rc == 0, err
    assert dcp_out == out


def test_chat_template_file_and_seeded_sampling(ckpt, capsys):
    argv = [
        "--checkpoint",
        ckpt["root"] / "hf",
        "--prompt",
        "What is two plus three?",
        "--chat_template",
        ckpt["root"] / "chatml.jinja",
        "--system",
        "Be brief.",
        "--temperature",
        0.8,
        "--top_p",
        0.9,
        "--seed",
        4,
        "--max_new_tokens",
        10,
    ]
    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    assert "tokens/s" in err
    assert run(capsys, *argv)[1] == out  # same seed, same text
    rc2, out2, _ = run(capsys, *argv[:-4], "--seed", 5, "--max_new_tokens", 10)
    assert rc2 == 0 and out2 != out


def test_chatml_prompt_rendering(ckpt):
    from torchtitan_nemotron3.generate.chat import load_tokenizer, render_prompt

    tok = load_tokenizer(ckpt["tokenizer"], str(ckpt["root"] / "chatml.jinja"))
    ids, text = render_prompt(tok, "hi", system="sys")
    assert (
        text == "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    assert tok.decode(ids) == text
    raw_ids, _ = render_prompt(tok, "hi", use_chat_template=False)
    assert raw_ids[0] == tok.bos_token_id and tok.decode(raw_ids[1:]) == "hi"


def test_stop_string_across_tokens(ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt["tokenizer"])
    ids = tok("Ada sang.<|im_end|>\nmore", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, ["<|im_end|>"])
    text, stopped = "", False
    for i in ids:
        new, stopped = stream.push(i)
        text += new
        if stopped:
            break
    assert stopped and text == "Ada sang."
    plain = TextStream(tok)
    assert "".join(plain.push(i)[0] for i in ids) + plain.finish() == tok.decode(ids)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--checkpoint", "{root}/missing"],
            "checkpoint {root}/missing does not exist",
        ),
        (
            ["--checkpoint", "{root}/hf"],
            "has no chat template: pass --chat_template FILE",
        ),
        (
            ["--checkpoint", "{root}/hf", "--no_chat_template", "--top_p", "0"],
            "top_p=0.0: must be in (0, 1]",
        ),
        (
            ["--checkpoint", "{root}/hf", "--no_chat_template", "--top_p", "1.5"],
            "top_p=1.5: must be in (0, 1]",
        ),
        (
            ["--checkpoint", "{root}/hf", "--chat_template", "{root}/nope.jinja"],
            "chat template file {root}/nope.jinja does not exist",
        ),
        (
            [
                "--checkpoint",
                "{root}/dcp",
                "--tokenizer",
                "{tok}",
                "--no_chat_template",
            ],
            "records no architecture: pass --flavor NAME",
        ),
        (
            [
                "--checkpoint",
                "{root}/dcp",
                "--no_chat_template",
                "--flavor",
                "debugmodel",
            ],
            "no tokenizer files in {root}/dcp: pass --tokenizer DIR",
        ),
        (
            ["--checkpoint", "{root}/hf", "--top_p", "x"],
            "argument --top_p: invalid float",
        ),
    ],
)
def test_bad_arguments_one_line(ckpt, capsys, args, message):
    fill = lambda s: s.format(root=ckpt["root"], tok=ckpt["tokenizer"])
    try:
        rc = cli.main([fill(a) for a in args] + ["--prompt", "hi"])
    except SystemExit as e:  # argparse's own refusals exit 2
        rc = e.code
    out, err = capsys.readouterr()
    assert rc in (1, 2) and out == ""
    assert err.count("\n") == 1 and err.startswith("generate.py: error: "), err
    assert fill(message) in err


@pytest.mark.integration
def test_script_runs_as_a_process(ckpt):
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--checkpoint",
            str(ckpt["root"] / "hf"),
            "--prompt",
            "On Monday, Ada",
            "--chat_template",
            str(ckpt["root"] / "chatml.jinja"),
            "--max_new_tokens",
            "8",
            "--seed",
            "1",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "tokens/s" in proc.stderr


def test_sft_tokenizer_own_template(ckpt, capsys):
    """The debug SFT tokenizer carries its ChatML template (chat_template.jinja) and
    ends turns with its EOS ``<|im_end|>``: no template flag needed, and the template's
    options pass through."""
    from torchtitan_nemotron3.generate.chat import (
        load_tokenizer,
        render_prompt,
        stop_token_ids,
    )
    from torchtitan_nemotron3.sft.assets import ensure_debug_sft_assets

    tokenizer, _ = ensure_debug_sft_assets()
    tok = load_tokenizer(tokenizer)
    _, text = render_prompt(
        tok, "What is two plus three?", template_kwargs={"enable_thinking": True}
    )
    assert text.startswith("<|im_start|>user\nWhat is two plus three?<|im_end|>\n")
    assert text.rstrip("\n").endswith(("<|im_start|>assistant", "<think>"))
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok, tokenizer)

    rc, _, err = run(
        capsys, "--checkpoint", ckpt["root"] / "dcp", "--flavor", "debugmodel",
        "--tokenizer", tokenizer, "--prompt", "What is two plus three?",
        "--template_kwargs", '{"enable_thinking": false}', "--max_new_tokens", 6,
    )  # fmt: skip
    assert rc == 0, err
    assert "tokens/s" in err
