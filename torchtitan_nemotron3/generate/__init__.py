"""Sampling from a NemotronH checkpoint with incremental decoding.

* ``mamba_parts.py``: the one place a Mamba2 mixer's parameters are read.
* ``cache.py``: what decoding carries per layer (conv + SSM state, KV cache).
* ``mamba_decode.py``, ``attention_decode.py``: each sequence mixer over a prompt
  (keeping its state) and one token at a time.
* ``decode.py``: ``prefill(model, tokens) -> cache, logits`` and
  ``step(model, cache, token) -> logits``.
* ``sampling.py``: greedy, temperature and top-p from a seeded generator.
* ``loop.py``: ``generate``: prefill, sample, step, stop; timed.
* ``checkpoint.py``: a model from a hub-format directory or a DCP checkpoint.
* ``chat.py``: tokenizer, chat template, stop tokens; ``text_stream.py``: streamed
  text and stop strings. ``scripts/generate.py`` is the command line.
"""

from .cache import DecodeCache, KVCache, MambaState
from .decode import prefill, step
from .loop import Generation, generate
from .sampling import SamplingConfig

__all__ = [
    "DecodeCache",
    "Generation",
    "KVCache",
    "MambaState",
    "SamplingConfig",
    "generate",
    "prefill",
    "step",
]
