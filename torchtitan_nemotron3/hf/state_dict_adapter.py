"""TorchTitan's bridge between our state dict and the hub's tensor names.

TorchTitan calls it in three places (components/checkpointer/dcp.py):

* ``initial_load_in_hf``: ``to_hf(live state dict)`` names the tensors to read,
  ``get_hf_storage_reader(path)`` reads them (DCP fills the returned tensors in
  place), ``from_hf`` turns them back into our names for ``load_state_dict``;
* ``last_save_in_hf``: ``to_hf`` of the (export-dtype) state dict, written by DCP's
  ``HuggingFaceStorageWriter``, into the files of ``fqn_to_index_mapping`` (the
  hub index found in ``hf_assets_path``) or one file. TorchTitan gives the adapter
  no output path and writes safetensors only: ``scripts/convert_checkpoint.py
  hf-config`` adds config.json and the tokenizer files. It also casts the state
  dict to ``export_dtype`` before ``to_hf``, so the fp32 router is exact only in a
  float32 export (``convert_checkpoint.py dcp-to-hf --dtype bfloat16`` keeps it
  exact in a bf16 one).

The live state dict is FSDP-sharded: every tensor may be a DTensor. Renames pass
DTensors through untouched; 3-D expert weights are split per expert without
communication (``experts.py``). The trainer loads with ``strict=False``, so
completeness is enforced here: an unmappable name or a missing expert raises.
"""

import os
from typing import Any

import torch
from torchtitan.protocols.state_dict_adapter import StateDictAdapter

from .experts import ExpertLayout, join_experts, split_experts
from .naming import (
    hub_names_on_disk,
    hub_to_ours,
    is_expert_weight,
    keep_fp32,
    ours_to_hub,
)
from .storage import NemotronHStorageReader


class NemotronHStateDictAdapter(StateDictAdapter):
    """``to_hf``/``from_hf``/``get_hf_storage_reader`` for NemotronH.

    Args:
        model_config: our ``NemotronHModel.Config`` (gives the number of experts).
        hf_assets_path: directory that may hold the hub's
            ``model.safetensors.index.json``; when it does, HF exports use the same
            file layout (``fqn_to_index_mapping``).
    """

    def __init__(self, model_config, hf_assets_path: str | None):
        super().__init__(model_config, hf_assets_path)
        moe_layers = [layer for layer in model_config.layers if layer.layer_type == "E"]
        self.num_experts = moe_layers[0].mixer.num_experts if moe_layers else 0
        # Layout of each sharded 3-D expert weight seen by to_hf, by our name: from_hf
        # rebuilds the same DTensors after DCP has loaded the pieces.
        self._expert_layouts: dict[str, ExpertLayout] = {}
        if self.fqn_to_index_mapping:
            self.fqn_to_index_mapping = self._hub_index(self.fqn_to_index_mapping)

    def _hub_index(self, mapping: dict[str, int]) -> dict[str, int]:
        """The asset index keyed by hub names (it may use the ``model.`` spelling,
        where a 3-D expert key stands for all E experts)."""
        hub_mapping = {}
        for key, index in mapping.items():
            stacked_shape = (self.num_experts, 0, 0) if "experts" in key else ()
            for hub_name, _ in hub_names_on_disk(key, stacked_shape):
                hub_mapping[hub_name] = index
        return hub_mapping

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Our names → hub names; 3-D experts → this rank's per-expert tensors
        (views, so DCP can load into them); the router (gate weight, correction
        bias) → fp32, as transformers writes it."""
        hf_state_dict = {}
        for name, value in state_dict.items():
            hub = ours_to_hub(name)
            if is_expert_weight(name):
                pieces, layout = split_experts(value)
                if layout is not None:
                    self._expert_layouts[name] = layout
                for k, piece in pieces.items():
                    hf_state_dict[hub.format(expert=k)] = piece
            else:
                if keep_fp32(name) and value.dtype != torch.float32:
                    value = value.float()
                hf_state_dict[hub] = value
        return hf_state_dict

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        """Hub names → ours; per-expert tensors are stacked back (into the DTensor
        layout ``to_hf`` recorded, if any). Raises ``ValueError`` naming the layer and
        expert indices when experts are missing, ``KeyError`` for a name that is not
        NemotronH's."""
        state_dict = {}
        experts: dict[str, dict[int, torch.Tensor]] = {}
        for hub, value in hf_state_dict.items():
            name, expert = hub_to_ours(hub)
            if expert is None:
                state_dict[name] = value
            else:
                experts.setdefault(name, {})[expert] = value
        for name, pieces in experts.items():
            state_dict[name] = join_experts(
                pieces, self.num_experts, self._expert_layouts.get(name), name
            )
        return state_dict

    def get_hf_storage_reader(
        self, path: str, from_quantized: bool = False
    ) -> NemotronHStorageReader:
        if from_quantized:
            raise NotImplementedError(
                "checkpoint.initial_load_in_hf_quantized: quantized NemotronH "
                "checkpoints are not supported"
            )
        return NemotronHStorageReader(os.fspath(path))
