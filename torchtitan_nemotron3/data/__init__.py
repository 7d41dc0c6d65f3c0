"""Pretraining data: Megatron's indexed dataset (``.bin`` + ``.idx``) read and written
in plain numpy (``indexed``), and offline tokenization of a corpus into it
(``prepare``; ``scripts/prepare_data.py``); blends (``blend``), packed rows
(``rows``), document sources (``sources``), the pretraining dataloader
(``pretrain``) and named validation sets (``validation``)."""

from .indexed import DataFileError, IndexedDataset, IndexedDatasetWriter, optimal_dtype

__all__ = ["DataFileError", "IndexedDataset", "IndexedDatasetWriter", "optimal_dtype"]
