"""Per-GPU memory and communication of a training layout, without the GPUs.

Used by ``python -m torchtitan_nemotron3.dry_run`` (measured on a meta model
parallelized by the package's own ``parallelize_nemotronh`` under a fake process
group) and ``benchmarks/layouts.py`` (also analytic, for layouts the package
cannot apply yet). Every number here is an estimate from shapes: a dry run
proves a layout is accepted and sized, not that it is fast.
"""
