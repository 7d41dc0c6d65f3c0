"""Show what a chat SFT job trains, before training::

    python -m torchtitan_nemotron3.sft.preview --config_file train_configs/debug_sft.toml \\
        [--n 3] [--section.field VALUE ...]

The job's first conversations (file order), rendered by its template with its
options, the trained tokens between ``[[`` and ``]]`` (green on a terminal), and
the counts. The same job file and flags as ``run_train.sh``, so a column mapping,
a template option or ``assistant_turns`` can be checked by eye in seconds.
"""

from __future__ import annotations

import argparse
import itertools
import sys

from .chat_data import to_messages
from .dataloader import ChatSFTDataLoader
from .render import ChatEncoder, ChatTemplate
from .sources import ChatSource


def marked(tokenizer, tokens: list[int], trained: list[bool], color: bool) -> str:
    """The text with each run of trained tokens wrapped."""
    on, off = ("\x1b[32m", "\x1b[0m") if color else ("[[", "]]")
    out = []
    for keep, run in itertools.groupby(zip(tokens, trained), key=lambda p: p[1]):
        text = tokenizer.decode([t for t, _ in run], skip_special_tokens=False)
        out.append(f"{on}{text}{off}" if keep else text)
    return "".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_file", required=True)
    parser.add_argument("--n", type=int, default=3, help="conversations to show")
    args, flags = parser.parse_known_args(sys.argv[1:] if argv is None else argv)

    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from ..train.toml_config import load_job

    config, _ = load_job(args.config_file, flags)
    data = config.dataloader
    if not isinstance(data, ChatSFTDataLoader.Config):
        raise SystemExit(f"{args.config_file}: the dataloader is not a chat SFT one")
    tokenizer = HuggingFaceTokenizer(tokenizer_path=config.hf_assets_path).tokenizer
    template = ChatTemplate.from_assets(config.hf_assets_path, data.template)
    encoder = ChatEncoder(
        template, tokenizer, config=data.template, assistant_turns=data.assistant_turns
    )
    print(f"template {template.origin}; turns {encoder.header!r} ... {encoder.end!r}")
    source = ChatSource(
        data.dataset_path,
        name=data.dataset_name,
        split=data.split,
        streaming=data.streaming,
        shuffle_seed=None,
        columns=data.columns.names(),
    )
    color = sys.stdout.isatty()
    for where, row in itertools.islice(source.rows(), args.n):
        encoded = encoder.encode(to_messages(row, data.columns, where), where)
        print(
            f"\n== {where}: {len(encoded.tokens)} tokens, "
            f"{sum(encoded.trained)} trained (seq_len {config.training.seq_len})"
        )
        print(marked(tokenizer, encoded.tokens, encoded.trained, color))


if __name__ == "__main__":
    main()
