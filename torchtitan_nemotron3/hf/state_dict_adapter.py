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
communication (``experts.py``); the Mamba2 parts are joined into the hub's packed
``in_proj`` / ``conv1d`` tensors and split back (``packed.py``). The trainer loads with ``strict=False``, so
completeness is enforced here: an unmappable name or a missing expert raises.
"""

import os
from typing import Any

import torch
from torchtitan.protocols.state_dict_adapter import StateDictAdapter

from .errors import CheckpointMismatchError
from .experts import ExpertLayout, join_experts, split_experts
from .files import scan_checkpoint
from .naming import (
    hub_names_on_disk,
    hub_to_ours,
    is_expert_weight,
    is_mtp,
    keep_fp32,
    ours_to_hub,
    packed_part,
    packed_parts,
)
from .packed import pack, PartLayout, unpack
from .storage import NemotronHStorageReader

# LoRA (torchtitan_nemotron3/lora): merged on export, ignored on load.
from .merge_hook import weight_merge


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
        # LoRA: {adapted module: alpha/rank}, empty without LoRA (lora/merge.py,
        # registered through merge_hook.py).
        self._merge = weight_merge()
        self._lora_scalings = self._merge.scalings(model_config)
        moe_layers = [layer for layer in model_config.layers if layer.layer_type == "E"]
        self.num_experts = moe_layers[0].mixer.num_experts if moe_layers else 0
        # Layout of each sharded 3-D expert weight seen by to_hf, by our name: from_hf
        # rebuilds the same DTensors after DCP has loaded the pieces.
        self._expert_layouts: dict[str, ExpertLayout] = {}
        # Likewise the layouts of the Mamba2 parts of each packed hub tensor.
        self._part_layouts: dict[str, list[PartLayout | None]] = {}
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
        (views, so DCP can load into them); the Mamba2 parts → the packed hub
        tensor (a full, plain copy: ``from_hf`` splits what DCP loads into it);
        the router (gate weight, correction bias) → fp32, as transformers writes it.
        Raises ``ValueError`` naming the packed tensor when some of its parts are
        missing from ``state_dict``."""
        # LoRA: fold adapters into their base weights (W + alpha/r·B·A) and drop
        # them (no hub name), so exports are merged and an initial load leaves
        # the adapters at their init (lora/merge.py).
        state_dict = self._merge.merge(state_dict, self._lora_scalings)
        hf_state_dict = {}
        packed: dict[str, dict[str, torch.Tensor]] = {}
        for name, value in state_dict.items():
            part = packed_part(name)
            if part is not None:
                packed.setdefault(part[0], {})[name] = value
                continue
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
        for hub, parts in packed.items():
            names = packed_parts(hub)
            missing = [n for n in names if n not in parts]
            if missing:
                raise ValueError(
                    f"{hub} packs {names}; the state dict lacks {missing}"
                )
            hf_state_dict[hub], layouts = pack([parts[n] for n in names])
            if any(layout is not None for layout in layouts):
                self._part_layouts[hub] = layouts
        return hf_state_dict

    def _part_sizes(self, names: list[str]) -> list[int]:
        """Rows of each Mamba2 part, from the model config."""
        sizes = []
        for name in names:
            layers = self.model_config.layers
            if is_mtp(name):
                layers, name = self.model_config.mtp.layers, name.removeprefix("mtp.")
            _, layer, _, module, part, _ = name.split(".")
            cfg = getattr(getattr(layers[int(layer)].mixer, module), part)
            sizes.append(cfg.out_features if module == "in_proj" else cfg.in_channels)
        return sizes

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        """Hub names → ours; per-expert tensors are stacked back and packed Mamba2
        tensors split into their parts (into the DTensor layouts ``to_hf``
        recorded, if any). Raises ``ValueError`` naming the layer and expert
        indices when experts are missing, ``KeyError`` for a name that is not
        NemotronH's."""
        state_dict = {}
        experts: dict[str, dict[int, torch.Tensor]] = {}
        for hub, value in hf_state_dict.items():
            names = packed_parts(hub)
            if names is not None:
                parts = unpack(
                    value, self._part_sizes(names), self._part_layouts.get(hub), hub
                )
                state_dict.update(zip(names, parts, strict=True))
                continue
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
        path = os.fspath(path)
        if getattr(self.model_config, "mtp", None) is not None and not any(
            is_mtp(name) for name in scan_checkpoint(path)
        ):
            raise CheckpointMismatchError(
                f"checkpoint {path} has no MTP (mtp.*) tensors, so it cannot be "
                "loaded into a model with MTP on; train with mtp_num_layers=0"
            )
        return NemotronHStorageReader(path)
