"""A DCP storage reader for NemotronH safetensors checkpoints in any spelling.

TorchTitan's ``initial_load_in_hf`` asks the adapter for a reader and loads the
hub-named state dict from ``to_hf`` through it. DCP's stock
``HuggingFaceStorageReader`` offers each file key as is, so a checkpoint written
with transformers' in-memory names (``model.`` prefix, 3-D experts) would fail with
missing keys. This reader offers hub names instead (see ``files.scan_checkpoint``)
and serves a read of expert ``k`` from row ``k`` of the stacked tensor. Reads of
sub-blocks (FSDP shards) touch only those bytes.

Every block read is checked for NaN/inf, as ``from_pretrained`` does: a damaged
initial checkpoint stops the run at load, naming the tensor and file, rather than
after the first steps as a NaN loss on every rank. The check reads bytes already in
memory, a small cost beside the read itself.
"""

from dataclasses import dataclass

import torch
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint._hf_utils import _HFStorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from .files import StoredTensor, check_finite, read_stored, scan_checkpoint


@dataclass
class _StoredInfo(_HFStorageInfo):
    """DCP's per-tensor storage info plus where the hub tensor sits in the file.
    Travels inside the metadata, so every rank can serve reads."""

    stored: StoredTensor | None = None


class NemotronHStorageReader(HuggingFaceStorageReader):
    """``HuggingFaceStorageReader`` that names tensors by hub name, whatever the
    spelling on disk (hub, ``model.``-prefixed, stacked 3-D experts)."""

    def read_metadata(self) -> Metadata:
        state_dict_metadata = {}
        storage_data = {}
        for name, stored in scan_checkpoint(str(self.path)).items():
            zeros = torch.Size([0] * len(stored.shape))
            state_dict_metadata[name] = TensorStorageMetadata(
                properties=TensorProperties(dtype=stored.dtype),
                size=torch.Size(stored.shape),
                chunks=[
                    ChunkStorageMetadata(offsets=zeros, sizes=torch.Size(stored.shape))
                ],
            )
            storage_data[MetadataIndex(fqn=name, offset=zeros)] = _StoredInfo(
                relative_path=stored.file,
                shape=torch.Size(stored.shape),
                dtype=stored.dtype,
                stored=stored,
            )
        metadata = Metadata(
            state_dict_metadata=state_dict_metadata, storage_data=storage_data
        )
        metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _process_read_request(self, f, req, planner) -> None:
        stored = self.storage_data[req.storage_index].stored
        slices = tuple(
            slice(offset, offset + length)
            for offset, length in zip(req.storage_offsets, req.lengths)
        )
        tensor = read_stored(f, stored, slices)
        check_finite(tensor, req.storage_index.fqn, stored.file)
        target = planner.resolve_tensor(req).detach()
        if target.size() != tensor.size():
            raise ValueError(
                f"{req.storage_index.fqn}: read a block of shape {tuple(tensor.shape)} "
                f"for a target of shape {tuple(target.shape)}"
            )
        target.copy_(tensor)
        planner.commit_tensor(req, target)
