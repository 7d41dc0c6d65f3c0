"""Multi-turn chat SFT data: conversations from JSONL/Parquet/hub datasets rendered by
the model's chat template, labels on the assistant's tokens only, packed rows.

``ChatSFTDataLoader.Config`` is the ``dataloader`` (and ``validator.dataloader``) of
the SFT configs in ``config_registry``; TorchTitan's trainer does the rest (the loss
is normalised by the assistant tokens of the global batch).
"""

from .chat_data import ChatColumns, ChatDataError, to_messages
from .dataloader import ChatSFTDataLoader, ChatSFTDataset
from .packing import Document, Packer, make_document
from .render import ChatEncoder, ChatTemplate, ChatTemplateConfig, detect_turn_markers
from .sources import ChatSource

__all__ = [
    "ChatColumns",
    "ChatDataError",
    "ChatEncoder",
    "ChatSFTDataLoader",
    "ChatSFTDataset",
    "ChatSource",
    "ChatTemplate",
    "ChatTemplateConfig",
    "Document",
    "Packer",
    "detect_turn_markers",
    "make_document",
    "to_messages",
]
