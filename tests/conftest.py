"""Under pytest-xdist (``-n 2``, as the README's test command runs) each worker
computes with one intra-op thread: two workers on two cores, each with as many
OpenMP threads as cores, spin-wait against each other (the training runs of
``train/_harness.py`` use one thread per rank for the same reason)."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption(
        "--matrix",
        action="store_true",
        help="also run the long matrices (tests marked 'matrix': every fault-injection "
        "phase, every layout); without it CI runs their default subset",
    )


def pytest_collection_modifyitems(config, items):
    """Tests marked ``matrix`` are deselected (not skipped) unless ``--matrix``:
    each long matrix keeps a default subset unmarked, which CI runs."""
    if config.getoption("--matrix"):
        return
    kept = [item for item in items if "matrix" not in item.keywords]
    if len(kept) != len(items):
        config.hook.pytest_deselected(
            items=[item for item in items if "matrix" in item.keywords]
        )
        items[:] = kept
