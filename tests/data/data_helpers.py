"""In-memory document sources and a word tokenizer for the data tests."""

import numpy as np


class MemorySource:
    """Documents as arrays: the source interface (``__len__``, ``doc_lengths``,
    ``__getitem__``) without files."""

    def __init__(self, docs, name="mem"):
        self.docs = [np.asarray(d, dtype=np.int64) for d in docs]
        self.doc_lengths = np.array([len(d) for d in self.docs], dtype=np.int64)
        self.name = self.identity = name

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        return self.docs[i]


def random_docs(n, seed=0, vocab=1000, eos=1, max_len=40):
    """n documents of 1..max_len tokens, each ending with EOS; token ids tell the
    document apart: document d's ids are d*vocab + (2..vocab-1)."""
    rng = np.random.default_rng(seed)
    docs = []
    for d in range(n):
        k = int(rng.integers(1, max_len + 1))
        body = d * vocab + rng.integers(2, vocab, size=k - 1)
        docs.append(np.concatenate([body, [eos]]))
    return docs


class WordTokenizer:
    """Splits on spaces; ids are assigned in first-seen order after 0 (bos), 1 (eos).
    Has what the loader uses of TorchTitan's HuggingFaceTokenizer."""

    bos_id, eos_id = 0, 1

    def __init__(self, vocab=4096):
        self.vocab, self.ids = vocab, {}

    def encode(self, text, add_bos=False, add_eos=False):
        ids = [self.ids.setdefault(w, 2 + len(self.ids)) for w in text.split()]
        return ([0] if add_bos else []) + ids + ([1] if add_eos else [])

    def get_vocab_size(self):
        return self.vocab
