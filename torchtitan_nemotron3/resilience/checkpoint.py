"""TorchTitan's ``CheckpointManager`` made safe against kills, corruption and rewinds.

What it changes (everything else is TorchTitan's):

* **Save**: DCP writes into ``.tmp-step-N`` and the coordinator renames it to
  ``step-N`` after ``.metadata`` and the checksum manifest (``commit.py``), in
  sync and async modes. TorchTitan's HF last step (``last_save_in_hf``) too: its
  ``HuggingFaceStorageWriter`` and the consolidation of the sharded safetensors
  (on the coordinator, or on every rank with a file index) write into
  ``.tmp-step-N``; once every rank is done, rank 0 runs ``before_hf_commit`` (the
  trainer's ``config.json``), checksums the files into the manifest and renames.
* **Load**: leftovers of killed saves and purges are removed; the newest committed
  step whose files match its manifest is loaded (the checks split over the ranks).
  A mismatch names the step and the file; ``on_corrupt = "fallback"`` moves that
  step aside to ``corrupt-<time>/`` with a warning and tries the previous one,
  ``"stop"`` raises. ``initial_load_path`` is used only when no step exists
  (TorchTitan's rule).
* **Rewind** (``load_step = K`` below the newest step): the later steps move to
  ``rewound-<time>-to-K/`` (kept, never loaded) and ``timeline.json`` records the
  rewind, so it acts once: a restart with the same ``load_step`` resumes the new
  timeline's newest step instead of going back to K again.
* **Purge** (``keep_latest_k``): counts only committed steps of the current
  timeline; a purged step is renamed to ``.trash-...`` first (atomic), then
  deleted in TorchTitan's purge thread, so a kill inside a purge never leaves a
  half-deleted ``step-N``.
* **RNG**: the per-rank generators (``rng.py``) are saved under ``rng``; a
  checkpoint without them loads with a warning.
* **Data-loader state**: a checkpoint without this rank's loader state (another
  data-parallel size, another loader) stops every rank naming the checkpoint,
  the rank and the remedy (``loader_state.py``), where TorchTitan warns and
  restarts that rank's data.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.checkpointer.dcp import AsyncMode
from torchtitan.tools.logging import logger
from torchtitan.tools.utils import GarbageCollection

from . import loader_state, rng
from .commit import CommitWriter, commit_step
from .layout import (
    MANIFEST,
    TIMELINE,
    committed_steps,
    fsync_dir,
    is_committed,
    stamp,
    step_of,
    tmp_dir,
)
from .manifest import (
    CheckpointCorruptError,
    check_files,
    file_sum,
    read_manifest,
    write_json_atomic,
    write_manifest,
)


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def move_aside(folder: str, steps: list[int], label: str) -> str:
    """Move ``step-N`` folders into ``<folder>/<label>-<time>/`` (kept, not loaded)."""
    aside = os.path.join(folder, f"{label}-{stamp()}")
    os.makedirs(aside, exist_ok=True)
    for step in steps:
        os.rename(os.path.join(folder, f"step-{step}"), os.path.join(aside, f"step-{step}"))
    fsync_dir(folder)
    return aside


def remove_leftovers(folder: str) -> list[str]:
    """Delete temporary folders of killed saves and purges (rank 0, at load)."""
    removed = []
    for name in sorted(os.listdir(folder)):
        if name.startswith((".tmp-step-", ".trash-")):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
            removed.append(name)
    return removed


class ResilientCheckpointManager(CheckpointManager):
    """``CheckpointManager`` with commit-by-rename saves, verified loads, one-shot
    rewinds and timeline-only purges (module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        on_corrupt: Literal["fallback", "stop"] = "fallback"
        """A step whose files differ from its manifest: "fallback" moves it aside
        to ``corrupt-<time>/`` with a warning and loads the previous step; "stop"
        raises naming the step and the file."""

        verify: bool = True
        """Check each file's size and checksum at load against the manifest
        that every save records."""

        def __post_init__(self) -> None:
            CheckpointManager.Config.__post_init__(self)
            if self.on_corrupt not in ("fallback", "stop"):
                raise ValueError(
                    f"checkpoint.on_corrupt={self.on_corrupt!r}: must be "
                    '"fallback" or "stop"'
                )

    def __init__(self, config: Config, **kwargs) -> None:
        super().__init__(config, **kwargs)
        if not self.enable:
            return
        self.on_corrupt = config.on_corrupt
        self.verify = config.verify
        self.states[rng.KEY] = rng.RngState()
        self.before_hf_commit = None
        """Called on rank 0 with the temporary folder of an HF last step, after
        every rank's files and before the manifest and the rename (the trainer
        writes ``config.json`` and the tokenizer files there)."""

    # ------------------------------------------------------------------ save

    def dcp_save(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: str,
        async_mode: AsyncMode,
        enable_garbage_collection: bool = False,
        to_hf: bool = False,
    ):
        if to_hf:
            return self._hf_save(
                state_dict, checkpoint_id, async_mode, enable_garbage_collection
            )
        writer = CommitWriter(
            checkpoint_id,
            step=step_of(os.path.basename(os.path.normpath(checkpoint_id))),
            states=sorted({k.split(".")[0] for k in state_dict}),
        )
        if async_mode == AsyncMode.ASYNC:
            ret = dcp.async_save(state_dict, storage_writer=writer, process_group=self.pg)
        elif async_mode == AsyncMode.ASYNC_WITH_PINNED_MEM:
            from torch.distributed.checkpoint.state_dict_saver import (
                AsyncCheckpointerType,
            )

            ret = dcp.async_save(
                state_dict,
                storage_writer=writer,
                process_group=self.pg,
                async_checkpointer_type=AsyncCheckpointerType.PROCESS,
                async_stager=self.stager,
            )
        else:
            ret = dcp.save(state_dict, storage_writer=writer)
        if enable_garbage_collection:
            GarbageCollection.collect("GC collection invoked by checkpointer.")
        return ret

    def _hf_save(self, state_dict, checkpoint_id, async_mode, gc) -> None:
        """TorchTitan's HF save into ``.tmp-step-N``, then manifest and rename."""
        if async_mode != AsyncMode.DISABLED:
            raise ValueError(
                "an HF-format save (checkpoint.last_save_in_hf) is synchronous: "
                f"async_mode {async_mode} is not supported for it"
            )
        rank, _ = _world()
        tmp = tmp_dir(checkpoint_id)
        if rank == 0 and os.path.exists(tmp):
            # The consolidation globs every *.safetensors of tmp/sharded.
            shutil.rmtree(tmp)
        _barrier()
        super().dcp_save(state_dict, tmp, async_mode, gc, to_hf=True)
        # dcp.save returns after the coordinator's finish (its consolidation); the
        # per-rank consolidation ends with a barrier: every file is written.
        if rank == 0:
            if self.before_hf_commit is not None:
                self.before_hf_commit(tmp)
            files = {}
            for root, _, names in os.walk(tmp):
                for name in names:
                    path = os.path.join(root, name)
                    files[os.path.relpath(path, tmp)] = file_sum(path)
            write_manifest(
                tmp, step_of(os.path.basename(os.path.normpath(checkpoint_id))),
                ["model"], files=files,
            )  # fmt: skip
            commit_step(tmp, checkpoint_id)
        _barrier()

    def _purge_stale_checkpoints(self):
        if not self._should_purge():
            return
        steps = committed_steps(self.folder)
        for step in steps[: -self.keep_latest_k]:
            src = os.path.join(self.folder, f"step-{step}")
            trash = os.path.join(self.folder, f".trash-step-{step}-{stamp()}")
            os.rename(src, trash)  # atomic: step-N is gone or whole
            self.purge_queue.put(trash)

    # ------------------------------------------------------------------ load

    def _find_load_step(self, folder: str = "") -> int:
        steps = committed_steps(folder or self.folder)
        return steps[-1] if steps else -1

    def latest_step(self) -> int:
        """The newest committed step of the current timeline (-1: none)."""
        return self._find_load_step() if self.enable else -1

    def _timeline(self) -> list[dict]:
        """The rewinds applied so far; one line naming the file if it cannot be
        read (a rewind applied twice would move the new timeline aside)."""
        path = os.path.join(self.folder, TIMELINE)
        if not os.path.exists(path):
            return []
        try:
            with open(path, "rb") as f:
                history = json.loads(f.read().decode("utf-8"))
        except (ValueError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError
            raise CheckpointCorruptError(f"{path}: unreadable rewind history ({e})") from None
        if not isinstance(history, list) or not all(
            isinstance(h, dict) and type(h.get("load_step")) is int
            and isinstance(h.get("time"), str)
            for h in history
        ):
            raise CheckpointCorruptError(
                f"{path}: not a rewind history (a list of {{load_step: int, time: str, ...}})"
            )
        return history

    def rewind_applied(self, step: int) -> bool:
        """Whether ``load_step = step`` was already applied (it acts once)."""
        history = self._timeline() if self.enable else []
        return bool(history) and history[-1]["load_step"] == step

    def _apply_rewind(self, step: int) -> int:
        """``load_step = step``: move later steps aside once; return the step to
        load (-1 once the rewind was applied by an earlier attempt)."""
        history = self._timeline()
        if self.rewind_applied(step):
            logger.info(
                f"checkpoint.load_step={step}: this rewind was applied at "
                f"{history[-1]['time']}; resuming the new timeline's newest step"
            )
            return -1
        rank, _ = _world()
        if rank == 0:
            later = [s for s in committed_steps(self.folder) if s > step]
            aside = None
            if later:
                aside = move_aside(self.folder, later, f"rewound-to-{step}")
                logger.warning(
                    f"Rewind to step {step}: moved steps {later} of the abandoned "
                    f"timeline to {aside} (kept, never loaded)"
                )
            history.append(
                {"load_step": step, "moved": later, "aside": aside,
                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            )  # fmt: skip
            write_json_atomic(os.path.join(self.folder, TIMELINE), history)
        _barrier()
        return step

    def _verify(self, step: int) -> str | None:
        """Check step's files against its manifest, split over the ranks; the
        first problem found by any rank, or None."""
        path = self._create_checkpoint_id(step)
        rank, world = _world()
        problem = None
        try:
            manifest = read_manifest(path)
        except CheckpointCorruptError as e:
            manifest, problem = None, str(e)
        if manifest is None and problem is None:
            if os.path.isfile(os.path.join(path, ".metadata")):
                logger.warning(
                    f"{path}: no {MANIFEST} (saved by plain TorchTitan or before "
                    "checksums): loading it unchecked"
                )
        elif manifest is not None:
            names = sorted(manifest["files"])[rank::world]
            problem = check_files(path, {n: manifest["files"][n] for n in names})
        problems = [p for p in _gather(problem) if p]
        return problems[0] if problems else None

    def _load(self, step: int = -1) -> bool:
        if not os.path.isdir(self.folder):
            return super()._load(step)
        rank, _ = _world()
        if rank == 0:
            removed = remove_leftovers(self.folder)
            if removed:
                logger.warning(
                    f"Removed unfinished saves/purges of a killed run: {removed}"
                )
        _barrier()
        if step != -1:
            step = self._apply_rewind(step)
        while True:
            steps = committed_steps(self.folder)
            candidate = step if step != -1 else (steps[-1] if steps else -1)
            if candidate == -1 or not self.verify:
                break
            if not is_committed(self._create_checkpoint_id(candidate)):
                break  # TorchTitan names the missing load_step
            problem = self._verify(candidate)
            if problem is None:
                break
            message = f"checkpoint step {candidate} is corrupt: {problem}"
            if self.on_corrupt == "stop" or step != -1:
                raise CheckpointCorruptError(
                    message + (" (checkpoint.on_corrupt = stop)" if step == -1 else
                               f" (checkpoint.load_step = {step})")
                )
            if rank == 0:
                aside = move_aside(self.folder, [candidate], "corrupt")
                logger.warning(f"{message}; moved it to {aside}, loading the previous step")
            _barrier()
        return super()._load(candidate if candidate != -1 else -1)

    def dcp_load(self, state_dict, checkpoint_id, from_hf, from_quantized) -> None:
        keys = None
        if not from_hf and (rng.KEY in state_dict or loader_state.KEY in state_dict):
            keys = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
        if keys is not None and loader_state.KEY in state_dict:
            rank, _ = _world()
            mine = loader_state.problem(state_dict[loader_state.KEY], keys, checkpoint_id, rank)
            problems = [p for p in _gather(mine) if p]  # every rank stops, or none
            if problems:
                more = f" (and {len(problems) - 1} other rank(s))" if len(problems) > 1 else ""
                raise loader_state.LoaderStateError(problems[0] + more)
        if keys is not None and rng.KEY in state_dict:
            if not any(k.startswith(f"{rng.KEY}.{rng.rank_key()}.") for k in keys):
                logger.warning(
                    f"{checkpoint_id} has no RNG state for this rank (saved "
                    "without it, or on another world size): random ops will not "
                    "resume bitwise"
                )
                state_dict = {k: v for k, v in state_dict.items() if k != rng.KEY}
        super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)


def resilient_config(config: CheckpointManager.Config) -> CheckpointManager.Config:
    """TorchTitan's plain ``CheckpointManager.Config`` as this manager's (same
    values, the new fields at their defaults); any other config unchanged."""
    if type(config) is not CheckpointManager.Config:
        return config
    from dataclasses import fields

    return ResilientCheckpointManager.Config(
        **{f.name: getattr(config, f.name) for f in fields(config)}
    )
