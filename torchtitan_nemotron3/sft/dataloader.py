"""TorchTitan dataloader for multi-turn chat SFT: ``dataloader = ChatSFTDataLoader.Config(...)``.

Rows are ``({"input": [L], "positions": [L]}, labels [L])`` like TorchTitan's text
loader, with ``-100`` on every label that is not an assistant token. Nothing else is
needed from the trainer: TorchTitan 0.3.0's ``train_step`` counts the labels that
are not ``-100`` over all gradient-accumulation micro-batches and all data-parallel
ranks (``global_valid_tokens``), and its loss divides the summed cross-entropy by
that count (FSDP's gradient division is off, ``disable_fsdp_gradient_division``).
So the loss is the mean over the assistant tokens of the global batch, whatever the
split into ranks and micro-batches, and TorchTitan's ``Validator`` (same loss, same
count) reports the held-out assistant-token loss when ``validator.dataloader`` is
one of these on a held-out split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.tools.logging import logger

from .chat_data import ChatColumns, ChatDataError, to_messages
from .packing import Packer, make_document
from .render import ChatEncoder, ChatTemplate, ChatTemplateConfig
from .sources import ChatSource


def open_chat_data(
    config,
    tokenizer: BaseTokenizer,
    *,
    needs: str,
    assistant_turns: str,
    dp_rank: int,
    dp_world_size: int,
    columns: list[str] | None = None,
) -> tuple[ChatTemplate, ChatEncoder, ChatSource]:
    """The chat template, its encoder and this rank's row source for a chat job
    (SFT rows, DPO pairs): both render with the template of ``hf_assets_path``,
    so both need TorchTitan's HuggingFaceTokenizer. ``needs`` says what for, in
    the error."""
    assets_dir = getattr(tokenizer, "tokenizer_path", None)
    fast = getattr(tokenizer, "tokenizer", None)
    if assets_dir is None or not hasattr(fast, "encode"):
        raise ChatDataError(
            f"{needs} needs TorchTitan's HuggingFaceTokenizer (the chat template "
            f"of hf_assets_path), got {type(tokenizer).__name__}"
        )
    if not config.dataset_path:
        raise ChatDataError(
            "dataloader.dataset_path: not set (a file, directory or hub id)"
        )
    template = ChatTemplate.from_assets(assets_dir, config.template)
    encoder = ChatEncoder(
        template, fast, config=config.template, assistant_turns=assistant_turns
    )
    source = ChatSource(
        config.dataset_path,
        name=config.dataset_name,
        split=config.split,
        streaming=config.streaming,
        shuffle_seed=config.shuffle_seed,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        columns=columns,
    )
    return template, encoder, source


class ChatSFTDataset(IterableDataset, Stateful):
    """Conversations of one rank, rendered, masked and packed into rows."""

    def __init__(
        self,
        config: ChatSFTDataLoader.Config,
        *,
        tokenizer: BaseTokenizer,
        seq_len: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
    ):
        template, self.encoder, self.source = open_chat_data(
            config,
            tokenizer,
            needs="chat SFT",
            assistant_turns=config.assistant_turns,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            columns=config.columns.names(),
        )
        pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
        self.packer = Packer(
            seq_len, pad_id, packing=config.packing, window=config.pack_window
        )
        self.config, self.seq_len, self.dp_rank = config, seq_len, dp_rank
        self.infinite = config.infinite
        self._rows_read = 0  # rows of this rank consumed in this epoch
        self._epoch = 0
        logger.info(
            f"[chat sft] {config.dataset_path} ({config.split}): template "
            f"{template.origin}, assistant turns {self.encoder.header!r} ... "
            f"{self.encoder.end!r} ({config.assistant_turns}), "
            f"{'packed' if config.packing else 'one conversation per row'}"
        )

    def _add(self, where: str, row: dict) -> bool:
        """Render, mask and queue one row; False when its conversation is dropped."""
        messages = to_messages(row, self.config.columns, where)
        encoded = self.encoder.encode(messages, where)
        doc, note = make_document(
            encoded.tokens, encoded.trained, self.seq_len, self.config.overflow
        )
        stats = self.packer.stats
        if doc is None:
            if not stats.dropped:
                logger.warning(
                    f"[chat sft] {where}: {len(encoded.tokens)} tokens, {note} "
                    f"{self.seq_len}: dropped (dataloader.overflow = "
                    f"{self.config.overflow!r}); drops are counted in the stats line"
                )
            stats.dropped[note] = stats.dropped.get(note, 0) + 1
            return False
        stats.truncated += note == "truncated"
        self.packer.add(doc)
        return True

    def _row(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs, labels, positions = self.packer.pop_row()
        stats = self.packer.stats
        if stats.rows == 1 or stats.rows % self.config.log_every_rows == 0:
            logger.info(f"[chat sft] rank {self.dp_rank}: {stats.line()}")
        return {
            "input": torch.tensor(inputs, dtype=torch.long),
            "positions": torch.tensor(positions, dtype=torch.long),
        }, torch.tensor(labels, dtype=torch.long)

    def __iter__(self):
        info = get_worker_info()  # each dataloader worker reads its own rows
        worker = (info.id, info.num_workers) if info is not None else (0, 1)
        while True:
            whole_pass, read, kept = self._rows_read == 0, 0, 0
            for where, row in self.source.rows(self._rows_read, self._epoch, worker):
                self._rows_read += 1
                read += 1
                kept += self._add(where, row)
                while self.packer.ready():
                    yield self._row()
            if whole_pass and not kept:  # never train on nothing without saying so
                raise ChatDataError(
                    f"{self.config.dataset_path}: rank {self.dp_rank} has no usable "
                    f"conversation ({read} rows, dropped: "
                    f"{self.packer.stats.dropped or 'none'}); raise training.seq_len or "
                    "set dataloader.overflow = 'truncate'"
                )
            if not self.infinite:
                while self.packer.pool:
                    yield self._row()
                logger.info(
                    f"[chat sft] rank {self.dp_rank}: end of data; "
                    f"{self.packer.stats.line()}"
                )
                return
            self._epoch += 1
            self._rows_read = 0
            logger.info(f"[chat sft] rank {self.dp_rank}: epoch {self._epoch} begins")

    def state_dict(self) -> dict[str, Any]:
        return {
            "rows_read": self._rows_read,
            "epoch": self._epoch,
            **self.packer.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rows_read = state_dict["rows_read"]
        self._epoch = state_dict["epoch"]
        self.packer.load_state_dict(state_dict)


class ChatSFTDataLoader(ParallelAwareDataloader):
    """Multi-turn chat SFT data: assistant-only labels, packed rows, per-rank rows."""

    # The rows' dataset; the DPO loader (``dpo/data.py``) reuses this constructor.
    dataset_class = ChatSFTDataset

    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        dataset: str = "chat"
        """A name for the logs (the data is ``dataset_path``)."""

        dataset_path: str | None = None
        """A .jsonl/.json/.parquet file, a directory of them (files named after
        ``split`` first), a glob, or a hub dataset id (streamed)."""

        dataset_name: str | None = None
        """Hub dataset configuration name (``load_dataset(path, name)``)."""

        split: str = "train"
        """Hub split; for a directory, files whose name starts with it."""

        streaming: bool = True
        """Stream hub datasets (local files are always read whole)."""

        shuffle_seed: int | None = 42
        """Local files: rows shuffled with seed + epoch ("None": file order)."""

        infinite: bool = True
        """Loop over the data (a new shuffle each epoch)."""

        columns: ChatColumns = field(default_factory=ChatColumns)
        template: ChatTemplateConfig = field(default_factory=ChatTemplateConfig)

        assistant_turns: Literal["all", "last"] = "all"
        """Train on every assistant turn, or on the last one only."""

        overflow: Literal["drop", "truncate"] = "drop"
        """A conversation longer than seq_len: dropped, or its first seq_len tokens
        kept (counted in the log either way)."""

        packing: bool = True
        """Several conversations per row (else one per row, padded)."""

        pack_window: int = 64
        """Conversations considered at once when filling a row."""

        log_every_rows: int = 100
        """Log packing efficiency, truncations and drops every this many rows."""

        def __post_init__(self):
            for key in ("pack_window", "log_every_rows"):
                if getattr(self, key) < 1:
                    raise ValueError(f"dataloader.{key}: must be >= 1")

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int,
        dp_rank: int,
        tokenizer: BaseTokenizer,
        seq_len: int,
        local_batch_size: int,
        snapshot_every_n_steps: int | None = 1,
        **kwargs,
    ):
        dataset = self.dataset_class(
            config,
            tokenizer=tokenizer,
            seq_len=seq_len,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
        )
        super().__init__(
            dataset,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            num_workers=config.num_workers,
            persistent_workers=config.persistent_workers,
            pin_memory=config.pin_memory,
            prefetch_factor=config.prefetch_factor,
            snapshot_every_n_steps=snapshot_every_n_steps,
            batch_size=local_batch_size,
        )
