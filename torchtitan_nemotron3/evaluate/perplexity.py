"""Validation perplexity of a text set: bits per token and bits per byte.

Each document is scored as lm-eval scores ``loglikelihood_rolling`` (the metric of
its perplexity tasks, e.g. wikitext): after the prefix token (BOS), in disjoint
windows of ``max_length`` tokens, every token predicted once. Bits per byte divide
the same total by the UTF-8 bytes of the text, so tokenizers of different
granularity compare on one scale.
"""

import json
import math
import os


def read_documents(paths: list[str]) -> list[str]:
    """A ``.jsonl`` file gives one document per line (its ``"text"``); any other
    file is one document. One-line errors for a missing file or a bad line."""
    docs = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"perplexity file {path} does not exist")
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(
                            f"{path}:{n}: not a JSON object with a \"text\" field"
                        ) from None
                    docs.append(text)
        else:
            with open(path, encoding="utf-8") as f:
                docs.append(f.read())
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"no text in {', '.join(paths)}")
    return docs


def text_perplexity(lm, docs: list[str]) -> dict:
    """``lm``: a ``NemotronLM`` (or any lm-eval ``TemplateLM``)."""
    from lm_eval.api.instance import Instance

    requests = [
        Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)
    ]
    nll = -sum(lm.loglikelihood_rolling(requests))
    tokens = sum(len(lm.tok_encode(d)) for d in docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return {
        "documents": len(docs),
        "tokens": tokens,
        "bytes": n_bytes,
        "nll_nats": nll,
        "bits_per_token": nll / tokens / math.log(2),
        "bits_per_byte": nll / n_bytes / math.log(2),
        "token_perplexity": math.exp(nll / tokens),
    }
