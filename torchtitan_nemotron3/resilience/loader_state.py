"""A resume whose checkpoint lacks this rank's data-loader state is refused.

TorchTitan's ``ParallelAwareDataloader`` saves one state per data-parallel rank
(``dp_rank_<i>``) and, handed a state without its key, only warns and starts that
rank's data from the beginning (rows trained again); through DCP the same case
is DCP's ``Missing key in checkpoint state_dict`` in a traceback per rank, and a
smaller data-parallel size is a bare ``assert``. Here the checkpoint's keys are
compared with what this rank's loader will ask for, before DCP reads anything,
and a rank that cannot resume its own data stops every rank (the decision is
gathered, so no rank waits in the load for one that refused) with the
checkpoint, the rank and the remedy.

A loader whose state is global (``PretrainDataLoader``: one row counter, the
same key on every rank) asks for the same keys at any data-parallel size and is
never refused here: it resumes the same global row.
"""

from __future__ import annotations

import re

from torch.distributed.checkpoint._nested_dict import flatten_state_dict

KEY = "dataloader"  # TorchTitan's checkpoint key of the train data loader
REMEDY = (
    f'set checkpoint.exclude_from_loading = ["{KEY}"] to start every rank\'s '
    "data from the beginning (rows already trained are trained again)"
)


class LoaderStateError(ValueError):
    """This rank's data-loader state is not in the checkpoint."""


def _per_rank(keys) -> list[int]:
    return sorted(int(m.group(1)) for k in keys if (m := re.fullmatch(rf"{KEY}\.dp_rank_(\d+)", k)))


def problem(loader, checkpoint_keys, checkpoint_id: str, rank: int) -> str | None:
    """Why ``loader`` (this rank's, global rank ``rank``) cannot resume from a
    checkpoint holding ``checkpoint_keys`` (its flattened keys); None if it can."""
    wanted = set(flatten_state_dict({KEY: loader.state_dict()})[0])
    saved = sorted(k for k in checkpoint_keys if k.startswith(KEY + "."))
    missing = sorted(wanted - set(saved))
    dp_rank = getattr(loader, "dp_rank", None)
    dp_size = getattr(loader, "dp_world_size", None)
    saved_ranks = _per_rank(saved)
    where = f"{checkpoint_id}: rank {rank}"
    if dp_rank is not None:
        where += f" (data-parallel rank {dp_rank} of {dp_size})"
    if not missing:
        if saved_ranks and _per_rank(wanted) and len(saved_ranks) != dp_size:
            return (
                f"{where}: the data-loader state is per data-parallel rank, saved at "
                f"data-parallel size {len(saved_ranks)}, and this run has {dp_size}: "
                "it cannot be split or merged (rows would be lost or repeated); "
                f"resume at data-parallel size {len(saved_ranks)}, or {REMEDY}"
            )
        return None
    if not saved:
        return f"{where}: the checkpoint has no data-loader state; {REMEDY}"
    if saved_ranks and _per_rank(wanted):
        return (
            f"{where}: no data-loader state for this rank ({', '.join(missing)}); "
            f"the checkpoint has it for data-parallel ranks {saved_ranks} (saved at "
            f"data-parallel size {len(saved_ranks)}, this run has {dp_size}). "
            "Resuming without it would start this rank's data from the beginning "
            f"(rows trained again): resume at data-parallel size {len(saved_ranks)}, "
            f"or {REMEDY}"
        )
    return (
        f"{where}: the checkpoint's data-loader state ({', '.join(saved)}) is not "
        f"what this run's {type(loader).__name__} saves ({', '.join(sorted(wanted))}): "
        f"another data loader wrote it; {REMEDY}"
    )
