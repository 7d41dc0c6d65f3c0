#!/usr/bin/env python
"""Sample from a NemotronH checkpoint (hub-format directory or TorchTitan DCP) with
incremental decoding, and print the text and tokens/s.

The prompt goes through the tokenizer's chat template (one user turn and the
assistant's generation prompt). Decoding runs the prompt once, then one token per
step: the Mamba layers carry their conv and SSM states (a step costs the same at any
length), attention carries its KV cache.

After training, the job file is all it needs: ``--config_file`` (with the
``--section.field VALUE`` overrides the run took, after the other flags) gives the
architecture, the tokenizer and chat template (``hf_assets_path``) and, without
``--checkpoint``, the job's newest complete checkpoint::

    CONFIG_FILE=train_configs/debug_sft.toml ./run_train.sh --checkpoint.enable
    python scripts/generate.py --config_file train_configs/debug_sft.toml \\
        --prompt "Which month comes after March?" --greedy

    python scripts/generate.py --config_file train_configs/debug_model.toml \\
        --no_chat_template --prompt "Ada went to" --greedy

    python scripts/generate.py --checkpoint out/hf --prompt "What is two plus three?"

    python scripts/generate.py --checkpoint nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 \\
        --prompt "Why is the sky blue?" --temperature 0.6 --top_p 0.95 \\
        --template_kwargs '{"enable_thinking": false}'

Without a job file: the tokenizer is the checkpoint directory's (an HF export carries
it) or ``--tokenizer DIR``; a DCP checkpoint records no architecture, so give
``--flavor`` or ``--config_json`` (both also override the job's). Without a chat
template in the tokenizer, pass ``--chat_template FILE`` or
``--no_chat_template`` (raw text after BOS). Generation stops at EOS (the
tokenizer's and generation_config.json's), at a ``--stop`` string, at ChatML's
``<|im_end|>`` when the prompt is ChatML, or after ``--max_new_tokens``.

The text goes to stdout as it is generated; the speeds to stderr.
"""

import argparse
import json
import sys
import warnings

import torch


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}")
    return dtype


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # one line, like the other errors of this script (no usage block)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="generate.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--config_file",
        help="the training job (train_configs/*.toml): architecture, tokenizer, "
        "chat template and checkpoint folder; the job's --section.field VALUE "
        "overrides (as run_train.sh took them) may follow",
    )
    p.add_argument(
        "--checkpoint",
        help="hub-format dir, Hub repo id, or DCP dir (default with --config_file: "
        "the job's newest complete checkpoint)",
    )
    p.add_argument("--prompt", required=True)
    p.add_argument(
        "--tokenizer",
        help="tokenizer directory (default: the checkpoint's, else the job's "
        "hf_assets_path)",
    )
    arch = p.add_mutually_exclusive_group()
    arch.add_argument(
        "--flavor", help="architecture of a DCP checkpoint (e.g. debugmodel)"
    )
    arch.add_argument(
        "--config_json", help="architecture of a DCP checkpoint (HF config.json)"
    )

    tpl = p.add_mutually_exclusive_group()
    tpl.add_argument(
        "--chat_template", help="a Jinja chat template file to use instead"
    )
    tpl.add_argument(
        "--no_chat_template", action="store_true", help="raw prompt after BOS"
    )
    p.add_argument("--system", help="a system message before the user turn")
    p.add_argument(
        "--template_kwargs",
        type=_json_object,
        default=None,
        help="JSON object passed to the template, e.g. '{\"enable_thinking\": false}'",
    )
    p.add_argument(
        "--greedy", action="store_true", help="argmax (same as --temperature 0)"
    )
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus mass in (0, 1]")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--stop", action="append", default=[], help="stop string (repeatable)"
    )
    p.add_argument(
        "--ignore_eos", action="store_true", help="do not stop at EOS (timing)"
    )
    p.add_argument(
        "--dtype", type=_dtype, default=None, help="default: the checkpoint's"
    )
    p.add_argument(
        "--device", default=None, help="default: cuda if available, else cpu"
    )
    p.add_argument(
        "--kernel_backend", default="auto", choices=("auto", "torch", "cuda")
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, 1 for a bad path / argument / checkpoint (one line on stderr,
    no traceback), 2 for a command line argparse refuses."""
    parser = _parser()
    opts, overrides = parser.parse_known_args(argv)
    if overrides and not (opts.config_file and overrides[0].startswith("--")):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    if not (opts.checkpoint or opts.config_file):
        parser.error("give --checkpoint DIR or --config_file JOB.toml")
    opts.overrides = overrides
    try:
        return _generate(opts)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 1


def _generate(opts) -> int:
    # TorchTitan's MoE asks CPU autocast for fp32 (a no-op it warns about at every
    # call); DCP warns that it loads on one process, which is the point here.
    warnings.filterwarnings("ignore", message="In CPU autocast")
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    from torchtitan_nemotron3.generate.chat import (
        load_tokenizer,
        render_prompt,
        stop_strings,
        stop_token_ids,
        tokenizer_dir,
        tokenizer_dir_or_none,
    )
    from torchtitan_nemotron3.generate.checkpoint import load_model, resolve_checkpoint
    from torchtitan_nemotron3.generate.loop import generate
    from torchtitan_nemotron3.generate.sampling import SamplingConfig
    from torchtitan_nemotron3.generate.text_stream import TextStream

    # Everything that can be refused is checked before the model is loaded.
    sampling = SamplingConfig(
        greedy=opts.greedy,
        temperature=opts.temperature,
        top_p=opts.top_p,
        seed=opts.seed,
    )
    if opts.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens {opts.max_new_tokens}: must be >= 1")
    job = args = None
    tokenizer = opts.tokenizer
    if opts.config_file:
        from torchtitan_nemotron3 import job as job_file

        job = job_file.load_job(opts.config_file, opts.overrides)
        if opts.checkpoint is None:
            opts.checkpoint = job_file.resolve_checkpoint(job, None)
            print(f"checkpoint: {opts.checkpoint}", file=sys.stderr)
        if not (opts.flavor or opts.config_json):
            args = job_file.model_args(job)
    checkpoint = resolve_checkpoint(opts.checkpoint)
    if job is not None and tokenizer is None:
        own = tokenizer_dir_or_none(checkpoint)
        tokenizer = own or job_file.tokenizer_dir(job)
    tok_dir = tokenizer_dir(checkpoint, tokenizer)
    tok = load_tokenizer(tok_dir, opts.chat_template)
    prompt_ids, prompt_text = render_prompt(
        tok,
        opts.prompt,
        use_chat_template=not opts.no_chat_template,
        system=opts.system,
        template_kwargs=opts.template_kwargs,
    )
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(
        checkpoint,
        flavor=opts.flavor,
        config_json=opts.config_json,
        args=args,
        dtype=opts.dtype,
        device=device,
        kernel_backend=opts.kernel_backend,
    )
    vocab = model.lm_head.weight.size(0)
    if prompt_ids and max(prompt_ids) >= vocab:
        raise ValueError(
            f"the tokenizer at {tok_dir} gives id {max(prompt_ids)}, beyond the model's "
            f"vocabulary of {vocab}: wrong --tokenizer?"
        )

    stops = set() if opts.ignore_eos else stop_token_ids(tok, tok_dir, checkpoint)
    stream = TextStream(tok, stop_strings(prompt_text, opts.stop))

    def on_token(token: int) -> bool:
        text, stop = stream.push(token)
        print(text, end="", flush=True)
        return stop

    result = generate(model, prompt_ids, sampling, opts.max_new_tokens, stops, on_token)
    print(stream.finish(), flush=True)
    why = "stop" if result.stopped else "max_new_tokens"
    print(
        f"prompt {result.prompt_len} tokens: prefill {result.prefill_s:.3f} s "
        f"({result.prefill_tokens_per_s:.1f} tokens/s); generated {len(result.tokens)} "
        f"tokens ({why}): {result.steps} decode steps in {result.decode_s:.3f} s "
        f"({result.decode_tokens_per_s:.1f} tokens/s) on {device}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
