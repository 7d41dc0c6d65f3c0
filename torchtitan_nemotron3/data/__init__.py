"""Pretraining data: Megatron's indexed dataset (``.bin`` + ``.idx``) read and written
in plain numpy (``indexed``), and offline tokenization of a corpus into it
(``prepare``; ``scripts/prepare_data.py``)."""

from .indexed import DataFileError, IndexedDataset, IndexedDatasetWriter, optimal_dtype

__all__ = ["DataFileError", "IndexedDataset", "IndexedDatasetWriter", "optimal_dtype"]
