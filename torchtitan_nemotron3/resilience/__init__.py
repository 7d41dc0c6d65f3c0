"""Surviving faults: commit-safe checkpoints (a step folder appears only once every
rank's data and a checksum manifest are written), verified loads that fall back
past a corrupt step, rewinds that move the abandoned timeline aside once, and
per-rank RNG state in the train state. The trainer wires them in; tests inject
faults from outside (``tests/faults``)."""
