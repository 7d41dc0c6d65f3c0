"""Evaluating a checkpoint: benchmarks through EleutherAI's lm-evaluation-harness, and
validation perplexity.

* ``packing.py``: loglikelihood requests packed many to a row (restarting
  positions keep them apart) and scored in one forward per batch of rows.
* ``lm_eval_model.py``: ``NemotronLM``, lm-eval's model interface over our model,
  registered as ``nemotron3`` (importing this package registers it).
* ``perplexity.py``: bits per token and per byte over a text set.
  ``scripts/evaluate.py`` is the command line.

lm-eval is the ``eval`` extra: ``pip install -e ".[eval]"``.
"""

from .lm_eval_model import NemotronLM
from .packing import pack_rows, score_requests

__all__ = ["NemotronLM", "pack_rows", "score_requests"]
