"""Under pytest-xdist (``-n 2``, as the README's test command runs) each worker
computes with one intra-op thread: two workers on two cores, each with as many
OpenMP threads as cores, spin-wait against each other (the training runs of
``train/_harness.py`` use one thread per rank for the same reason)."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
