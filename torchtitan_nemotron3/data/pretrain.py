"""TorchTitan dataloader for (continued) pretraining: ``dataloader =
PretrainDataLoader.Config(blend="0.7 data/web_text_document 0.3 data/code_text_document")``
(``[dataloader] blend`` in a job file, ``--dataloader.blend`` on the command line).

Rows are a pure function of their global row number ``g``: the blend
(``blend.GreedyBlend``) names the source and its row, the source's packing
(``rows.SourceRows``) builds it. Global batch ``b`` is rows ``[b·G, (b+1)·G)``
with ``G = dp × local_batch``; data-parallel rank ``r`` takes the contiguous slice
``[b·G + r·B, b·G + (r+1)·B)``, and dataloader worker ``w`` of ``W`` builds the
local batches ``b ≡ w (mod W)`` (``StatefulDataLoader`` serves workers' batches
round-robin, in order). So every row is served once across ranks and workers,
and the data state is one global counter, ``consumed_rows``, the same on every
rank: a checkpoint resumes the same global batches at any data-parallel size
(and with any worker count) as long as ``G`` is unchanged; with another ``G`` the
run continues from the same global row.

Batches are TorchTitan's contract, ``({"input": [B, L], "positions": [B, L]},
labels [B, L])``, so the trainer, validator, CP and PP need nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.tools.logging import logger

from .blend import GreedyBlend, parse_blend
from .rows import SourceRows
from .sources import TEXT_SUFFIXES, HeldOut, SourceError, open_source


class DataStateError(ValueError):
    """A checkpoint's data state that does not match this run's data."""


class PretrainRows:
    """The global row stream of one blend: sources, their packing and the blend."""

    def __init__(self, config: PretrainDataLoader.Config, *, tokenizer, seq_len: int):
        entries = parse_blend(config.blend)
        vocab_size = config.vocab_size
        if vocab_size is None and tokenizer is not None:
            vocab_size = tokenizer.get_vocab_size()
        self.names, self.sources = [], []
        for e in entries:
            source = open_source(e.spec, tokenizer, config.text_key, config.verify_checksums)
            if config.valid_fraction > 0:
                source = HeldOut(source, config.valid_fraction, config.split, config.seed)
            rows = SourceRows(
                source,
                seq_len=seq_len,
                seed=config.seed,
                isolate_documents=config.isolate_documents,
                shuffle=config.shuffle,
                vocab_size=vocab_size,
            )
            if rows.rows_per_epoch == 0:
                raise SourceError(
                    f"{e.spec}: empty source: {len(source)} documents, "
                    f"{rows.tokens_per_epoch} tokens, not one row of seq_len {seq_len}"
                )
            self.names.append(_short_name(e.spec, self.names))
            self.sources.append(rows)
        self.weights = [e.weight for e in entries]
        self.blend = GreedyBlend(self.weights)
        self.seq_len = seq_len
        tokenizer_id = _tokenizer_identity(tokenizer)
        self.fingerprint = {
            # names, not paths: moved files with the same content resume
            "blend": " ".join(f"{w:.6g} {n}" for w, n in zip(self.weights, self.names)),
            "sources": [rows.source.identity for rows in self.sources],
            "tokenizer": tokenizer_id,
            "seq_len": seq_len,
            "seed": config.seed,
            "isolate_documents": config.isolate_documents,
            "shuffle": config.shuffle,
            "split": f"{config.split}:{config.valid_fraction}",
        }

    def row(self, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k, q = self.blend.locate(g)
        inputs, labels, positions, _ = self.sources[k].row(q)
        return inputs, labels, positions

    def epochs(self, g: int) -> list[int]:
        """Each source's epoch at global row ``g`` (how often it has wrapped)."""
        counts = self.blend.counts(g + 1)
        return [int(c - 1) // s.rows_per_epoch if c else 0
                for c, s in zip(counts, self.sources)]

    def describe(self) -> str:
        return "; ".join(
            f"{n}: weight {w:.4g}, {len(s.source)} docs, {s.tokens_per_epoch} tokens, "
            f"{s.rows_per_epoch} rows/epoch"
            + (f" ({s.tokens_per_epoch - s.rows_per_epoch * s.seq_len} tail tokens "
               "left out per epoch)" if s.isolate else "")
            for n, w, s in zip(self.names, self.weights, self.sources)
        )


def _short_name(spec: str, taken: list[str]) -> str:
    """A source's name in logs and metrics: its file name without the usual
    suffixes (``data/web_text_document`` → ``web``), numbered if taken."""
    base = spec.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (*TEXT_SUFFIXES, "_text_document", "_document"):
        base = base.removesuffix(suffix)
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in base) or "source"
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}{i}"
    return name


def _tokenizer_identity(tokenizer) -> str:
    """The tokenizer file's hash where there is one (what the ids mean)."""
    import hashlib
    import os

    path = getattr(tokenizer, "tokenizer_path", None)
    if path:
        f = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if os.path.isfile(f):
            with open(f, "rb") as fh:
                return "sha256:" + hashlib.sha256(fh.read()).hexdigest()[:16]
    vocab = tokenizer.get_vocab_size() if tokenizer is not None else None
    return f"{type(tokenizer).__name__}:vocab={vocab}"


class PretrainDataset(IterableDataset):
    """The local batches of one rank (and worker), row by row, from ``start_row``."""

    def __init__(self, rows: PretrainRows, *, dp_rank: int, dp_world_size: int,
                 local_batch_size: int, infinite: bool):
        self.rows, self.dp_rank, self.dp_world_size = rows, dp_rank, dp_world_size
        self.B, self.infinite = local_batch_size, infinite
        self.G = dp_world_size * local_batch_size
        self.start_row = 0

    def batch_rows(self, b: int) -> range:
        first = self.start_row + b * self.G + self.dp_rank * self.B
        return range(first, first + self.B)

    def _in_first_epoch(self, b: int) -> bool:
        last = self.start_row + (b + 1) * self.G - 1  # the whole global batch
        return max(self.rows.epochs(last)) == 0

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        b = worker
        while True:
            if not self.infinite and not self._in_first_epoch(b):
                return  # finite: stop before any source's second epoch (all ranks alike)
            for g in self.batch_rows(b):
                inputs, labels, positions = self.rows.row(g)
                yield {
                    "input": torch.from_numpy(inputs),
                    "positions": torch.from_numpy(positions),
                }, torch.from_numpy(labels)
            b += workers


class PretrainDataLoader(ParallelAwareDataloader):
    """Pretraining rows from a blend of pre-tokenized (or small text) sources."""

    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        dataset: str = "pretrain"
        """A name for the logs (the data is ``blend``)."""

        blend: str = ""
        """Megatron ``--data-path`` form: ``"0.7 data/web_text_document 0.3
        data/code_text_document"``, or one source. A source is a Megatron prefix
        (``<prefix>.bin`` + ``.idx``, from ``scripts/prepare_data.py``) or text
        files tokenized at start-up (.jsonl/.json/.parquet/.txt, a directory or a
        glob). Weights are normalised."""

        seed: int = 1234
        """Seeds each source's document shuffle (a new shuffle every epoch)."""

        shuffle: bool = True
        """Shuffle documents per epoch (else file order every epoch)."""

        isolate_documents: bool = True
        """Positions restart at every document and no label crosses into the next
        (TorchTitan's text path); False: NVIDIA's pretraining stream (the
        EOS-separated concatenation, positions 0..L-1)."""

        text_key: str = "text"
        """The text field of .jsonl/.json/.parquet text sources."""

        valid_fraction: float = 0.0
        """Hold out this fraction of every source's documents (seeded; the same
        choice in training and validation). Training reads the rest."""

        split: str = "train"
        """"train" (documents not held out) or "valid" (the held-out ones;
        without ``valid_fraction``: all documents, i.e. separate held-out files)."""

        infinite: bool = True
        """Loop over epochs; False stops before any source's second epoch
        (the validator sets it from ``validator.steps``)."""

        vocab_size: int | None = None
        """Token ids must be below this (the model's vocabulary; the trainer fills
        it in; None: the tokenizer's)."""

        verify_checksums: bool = False
        """Check each Megatron source's ``.bin`` against the SHA-256 its
        ``.manifest.json`` recorded (``scripts/prepare_data.py``), on every rank at
        start-up: a changed token value is otherwise undetectable, but this reads
        the whole ``.bin`` (about 1.7 GB/s a core: ~10 min a TB). Sizes and the
        ``.idx`` SHA-256 are always checked when a manifest exists."""

        allow_data_change: bool = False
        """Resume from a checkpoint whose blend, sources, tokenizer, seq_len,
        seed or isolation differ (continuing at the same global row)."""

        def __post_init__(self):
            if not 0.0 <= self.valid_fraction < 1.0:
                raise ValueError(
                    f"dataloader.valid_fraction={self.valid_fraction}: must be in [0, 1)"
                )
            if self.split not in ("train", "valid"):
                raise ValueError(f"dataloader.split={self.split!r}: 'train' or 'valid'")
            if self.blend:
                parse_blend(self.blend)  # weights and pairs checked at config load

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int,
        dp_rank: int,
        tokenizer: BaseTokenizer | None,
        seq_len: int,
        local_batch_size: int,
        snapshot_every_n_steps: int | None = 1,
        **kwargs,
    ):
        rows = PretrainRows(config, tokenizer=tokenizer, seq_len=seq_len)
        dataset = PretrainDataset(
            rows,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            local_batch_size=local_batch_size,
            infinite=config.infinite,
        )
        if config.persistent_workers:
            # the start row is handed to the workers when they start
            logger.warning("[pretrain data] persistent_workers ignored (workers start per iterator)")
        super().__init__(
            dataset,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            num_workers=config.num_workers,
            pin_memory=config.pin_memory,
            prefetch_factor=config.prefetch_factor,
            batch_size=local_batch_size,
        )
        self.config, self.rows, self.pretrain_dataset = config, rows, dataset
        self.global_batch = dataset.G
        self.consumed_rows = 0
        if dp_rank == 0:
            logger.info(f"[pretrain data] {rows.describe()}")

    def __iter__(self):
        self.pretrain_dataset.start_row = self.consumed_rows
        for batch in super().__iter__():
            self.consumed_rows += self.global_batch
            yield batch

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The same on every rank (no per-rank key, no world size): saved once."""
        return {
            "consumed_rows": self.consumed_rows,
            "global_batch": self.global_batch,
            "fingerprint": json.dumps(self.rows.fingerprint, sort_keys=True),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict or "consumed_rows" not in state_dict:
            if state_dict:
                raise DataStateError(
                    "checkpoint's dataloader state is not a pretraining loader's "
                    f"(keys {sorted(state_dict)}); set checkpoint.exclude_from_loading "
                    '= ["dataloader"] to start the data from row 0'
                )
            return
        what = data_changes(state_dict["fingerprint"], self.rows.fingerprint,
                            self.config.allow_data_change)
        if what:
            logger.warning(f"[pretrain data] data changed since the checkpoint ({what})")
        self.consumed_rows = int(state_dict["consumed_rows"])
        if int(state_dict["global_batch"]) != self.global_batch:
            logger.warning(
                f"[pretrain data] global batch {state_dict['global_batch']} rows at "
                f"save, {self.global_batch} now: continuing from global row "
                f"{self.consumed_rows}"
            )
        logger.info(f"[pretrain data] resuming at global row {self.consumed_rows}")

    # ---------------------------------------------------------------- metrics
    def data_metrics(self) -> dict[str, float]:
        """Each source's share of the rows consumed so far and its epoch
        (fractional: rows served / rows per epoch)."""
        n = self.consumed_rows
        counts = self.rows.blend.counts(n)
        out = {}
        for name, c, s in zip(self.rows.names, counts, self.rows.sources):
            out[f"data/{name}/share"] = float(c) / n if n else 0.0
            out[f"data/{name}/epoch"] = float(c) / s.rows_per_epoch
        return out


def data_changes(saved_fingerprint: str, ours: dict, allow: bool) -> str:
    """What differs between a checkpoint's data fingerprint and this run's ("" if
    nothing); raises ``DataStateError`` unless ``allow``."""
    saved = json.loads(saved_fingerprint)
    changed = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
    what = "; ".join(f"{k}: {saved.get(k)!r} -> {ours.get(k)!r}" for k in changed)
    if what and not allow:
        raise DataStateError(
            f"resume refused: the data differs from the checkpoint's ({what}); "
            "set dataloader.allow_data_change = true to continue on the new "
            "data from the same global row"
        )
    return what


def check_checkpoint_data(config, checkpoint_dir: str) -> None:
    """The resume check of ``load_state_dict``, in one plain process before any
    rank starts: read the checkpoint's data state (DCP, no process group) and
    compare it with what ``config`` (a trainer config) would read."""
    import torch.distributed.checkpoint as dcp

    state = {"dataloader": {"consumed_rows": 0, "global_batch": 0, "fingerprint": ""}}
    try:
        dcp.load(state, checkpoint_id=checkpoint_dir)
    except Exception:  # no pretraining data state there: the ranks say what is wrong
        return
    tokenizer = config.tokenizer.build(tokenizer_path=config.hf_assets_path)
    rows = PretrainRows(config.dataloader, tokenizer=tokenizer, seq_len=config.training.seq_len)
    data_changes(state["dataloader"]["fingerprint"], rows.fingerprint,
                 config.dataloader.allow_data_change)
