"""Names inside a checkpoint folder.

Only ``step-N`` folders at the top level are the current timeline and only they
are ever loaded. Everything else is named so that neither TorchTitan's
``re.search(r"step-(\\d+)")`` scans nor ours mistake it for a step: a save in
progress (``.tmp-step-N``), a purge in progress (``.trash-...``), and folders kept
aside (``rewound-.../step-N``, ``corrupt-.../step-N``).
"""

from __future__ import annotations

import os
import re
import time

MANIFEST = "manifest.json"
TIMELINE = "timeline.json"
_STEP = re.compile(r"step-(\d+)")


def tmp_dir(final: str) -> str:
    """Where a save of ``final`` (``.../step-N``) writes before its commit."""
    parent, name = os.path.split(os.path.normpath(final))
    return os.path.join(parent, f".tmp-{name}")


def step_of(name: str) -> int | None:
    m = _STEP.fullmatch(name)
    return int(m.group(1)) if m else None


def is_committed(path: str) -> bool:
    """A DCP step (``.metadata``) or TorchTitan's HF last step (index file)."""
    return os.path.isfile(os.path.join(path, ".metadata")) or os.path.isfile(
        os.path.join(path, "model.safetensors.index.json")
    )


def committed_steps(folder: str) -> list[int]:
    """The current timeline's committed steps, ascending."""
    if not os.path.isdir(folder):
        return []
    steps = []
    for name in os.listdir(folder):
        step = step_of(name)
        if step is not None and is_committed(os.path.join(folder, name)):
            steps.append(step)
    return sorted(steps)


def stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
