"""Validation perplexity of a held-out set: bits per token and bits per byte.

The set is text (``.jsonl`` with a ``"text"`` field per line, or plain files, one
document each) or pre-tokenized (a Megatron indexed dataset ``PREFIX.bin`` +
``PREFIX.idx``, as ``scripts/prepare_data.py`` writes; its tokens are scored as
stored). Each document is scored as lm-eval scores ``loglikelihood_rolling`` (the
metric of its perplexity tasks, e.g. wikitext): after the prefix token (BOS), in
disjoint windows of ``max_length`` tokens, every token predicted once. Bits per byte
divide the same total by the UTF-8 bytes of the text (for a pre-tokenized set, of
the documents decoded without special tokens), so tokenizers of different
granularity compare on one scale.
"""

import json
import math
import os


def is_indexed(path: str) -> bool:
    """``path`` names an indexed dataset: its prefix, or its .bin / .idx."""
    prefix = _prefix(path)
    return os.path.isfile(prefix + ".idx") or os.path.isfile(prefix + ".bin")


def _prefix(path: str) -> str:
    return path[: -len(".bin")] if path.endswith((".bin", ".idx")) else path


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
                            f'{path}:{n}: not a JSON object with a "text" field'
                        ) from None
                    docs.append(text)
        else:
            with open(path, encoding="utf-8") as f:
                docs.append(f.read())
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"no text in {', '.join(paths)}")
    return docs


def read_token_documents(paths: list[str], vocab_size: int, limit: int | None = None):
    """The documents of indexed datasets (token id lists), the first ``limit`` of
    each; a token id beyond the model's vocabulary is refused in one line."""
    from ..data.indexed import IndexedDataset

    docs = []
    for path in paths:
        ds = IndexedDataset(_prefix(path))
        ds.check_token_ids(vocab_size)
        n = len(ds) if limit is None else min(limit, len(ds))
        docs += [ds[k].tolist() for k in range(n)]
    return docs


def _summary(nll: float, tokens: int, n_bytes: int, documents: int) -> dict:
    return {
        "documents": documents,
        "tokens": tokens,
        "bytes": n_bytes,
        "nll_nats": nll,
        "bits_per_token": nll / tokens / math.log(2),
        "bits_per_byte": nll / n_bytes / math.log(2),
        "token_perplexity": math.exp(nll / tokens),
    }


def text_perplexity(lm, docs: list[str]) -> dict:
    """``lm``: a ``NemotronLM``; documents tokenized as lm-eval tokenizes them."""
    token_lists = [lm.tok_encode(d) for d in docs]
    nll = -sum(lm.rolling_loglikelihoods(token_lists))
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return _summary(nll, sum(map(len, token_lists)), n_bytes, len(docs))


def token_perplexity(lm, token_lists: list[list[int]]) -> dict:
    """Pre-tokenized documents, scored as stored."""
    nll = -sum(lm.rolling_loglikelihoods(token_lists))
    n_bytes = sum(
        len(lm.tok_decode(t, skip_special_tokens=True).encode("utf-8"))
        for t in token_lists
    )
    return _summary(nll, sum(map(len, token_lists)), n_bytes, len(token_lists))


def perplexity(lm, paths: list[str], limit: int | None = None) -> dict:
    """Text files or indexed datasets (all of one kind)."""
    indexed = [is_indexed(p) for p in paths]
    if any(indexed) and not all(indexed):
        raise ValueError(
            "--perplexity: pass text files or indexed datasets, not both "
            f"({', '.join(paths)})"
        )
    if all(indexed):
        vocab = lm.model.lm_head.weight.size(0)
        return token_perplexity(lm, read_token_documents(paths, vocab, limit))
    docs = read_documents(paths)
    return text_perplexity(lm, docs[:limit] if limit is not None else docs)
