"""``config.json`` ↔ :class:`NemotronHArgs`.

Three writers produce NemotronH configs and they disagree on spelling: the hub's
remote code (``hybrid_override_pattern`` string, ``num_hidden_layers``), Megatron
(``mamba_*`` aliases, ``|`` in the pattern) and transformers 5.x
(``layers_block_type`` list, ``time_step_limit`` as ``[0.0, {"__float__":
"Infinity"}]``, no pattern string, no ``num_hidden_layers``). Reading accepts all of
them; writing produces what transformers 5.x loads without ``trust_remote_code``
plus the pattern string the hub's remote code needs.

Architecture fields map 1:1 (``NemotronHArgs`` uses transformers' names). Fields
that do not change the trained function (generation, caching, RoPE leftovers: the
model has no positional encoding) are ignored by name; a value the model cannot
honour is rejected by ``NemotronHArgs.validate`` or here, naming the field; a field
nobody here knows is ignored with a warning, so a new transformers release does not
break loading but does not go unnoticed either.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any

import torch

from torchtitan_nemotron3.model.args import NemotronHArgs
from torchtitan_nemotron3.model.pattern import (
    ATTENTION,
    MAMBA,
    MLP,
    MOE,
    parse_hybrid_pattern,
    to_hf_block_types,
)

from .errors import read_json

MODEL_TYPE = "nemotron_h"
ARCHITECTURE = "NemotronHForCausalLM"
CONFIG_NAME = "config.json"

# Older (Megatron / remote-code) spellings, as transformers' NemotronHConfig maps them.
_ALIASES = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "num_local_experts": "n_routed_experts",
    "layer_types": "layers_block_type",
}

# Fields that do not change the function the weights compute (or only matter to
# inference code paths), so a config may carry any value for them.
_IGNORED = {
    "architectures",
    "auto_map",
    "model_type",
    "transformers_version",
    "_name_or_path",
    "name_or_path",
    "torch_dtype",
    "dtype",
    "use_cache",
    "num_logits_to_keep",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rope_type",
    "partial_rotary_factor",
    "use_mamba_kernels",
    "mamba_ssm_cache_dtype",
    "output_router_logits",
    "moe_shared_expert_overlap",
    "residual_in_fp32",
    "hidden_dropout",
    "attention_dropout",
    "tie_word_embeddings_in_config",
    "generation_config",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "tokenizer_class",
    "chunk_size_feed_forward",
    # d_inner is mamba_num_heads * mamba_head_dim; ``expand`` is a stale duplicate
    "expand",
    "mamba_expand",
    # transformers reads ``use_bias`` for the Mamba projections and ignores this one
    "mamba_proj_bias",
    # derived from the pattern here; checked against it when present
    "num_hidden_layers",
}

# Fields accepted only with one value, because the model implements only that one.
_REQUIRED_VALUES = {
    "sliding_window": (None, "sliding-window attention is not implemented"),
    "quantization_config": (None, "quantized checkpoints are not supported"),
}

_FIELDS = {f.name for f in dataclasses.fields(NemotronHArgs)}
# transformers' list spellings of the main and the MTP pattern.
_PATTERN_LISTS = {"layers_block_type", "mtp_layers_block_type"}
# Ours only (aux-loss-free balancing rate, pipeline stage boundaries): never read
# from or written to config.json.
# MTP depth and loss weight are training choices (the checkpoint only says whether
# an MTP block is stored).
_NOT_HF = {
    "load_balance_coeff",
    "moe_seq_aux_loss_coeff",
    "pipeline_segments",
    "mtp_num_layers",
    "mtp_loss_scaling_factor",
}


def _decode_float(value: Any, field: str) -> float:
    """A float from JSON: a number, transformers' ``{"__float__": "Infinity"}``, or
    a string such as ``"inf"`` / ``"Infinity"``."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        value = value["__float__"]
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{field}: cannot read {value!r} as a float") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{field}: expected a number, got {value!r}")


def _encode_float(value: float) -> Any:
    """transformers' encoding of the floats JSON cannot hold."""
    if math.isinf(value):
        return {"__float__": "Infinity" if value > 0 else "-Infinity"}
    if math.isnan(value):
        return {"__float__": "NaN"}
    return value


def load_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory (or the file itself);
    ``CorruptCheckpointError`` naming the file if it is not a JSON object."""
    path = os.fspath(path)
    file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"no {CONFIG_NAME} at {file}: a NemotronH checkpoint directory needs one "
            "to know the architecture"
        )
    return read_json(file)


def _check_type(key: str, name: str, value: Any) -> None:
    """A used field's value has the type of its default (a bool is not a number,
    a number not a bool): a wrong type is a bad file, not a silent change."""
    default = getattr(NemotronHArgs, name, None)
    if value is None or default is None:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(value, str):  # "inf", "1e-5": how some files spell floats
            try:
                float(value)
                ok = True
            except ValueError:
                ok = False
    elif isinstance(default, str):
        ok = isinstance(value, (str, list))
    else:
        return
    if not ok:
        raise ValueError(
            f"{key}={value!r}: expected {type(default).__name__}, "
            f"found {type(value).__name__}"
        )


def args_from_hf_config(
    config: dict[str, Any] | str | os.PathLike, **overrides: Any
) -> NemotronHArgs:
    """``NemotronHArgs`` from a ``config.json`` dict, file or checkpoint directory.

    ``overrides`` replace fields afterwards (e.g. ``load_balance_coeff``). Raises
    ``ValueError`` naming the field for another ``model_type``, conflicting
    aliases, a pattern that disagrees with ``num_hidden_layers``, or a value the
    model does not implement (MTP layers, sliding window, ...).
    """
    if not isinstance(config, dict):
        config = load_hf_config(config)
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise ValueError(
            f"config.json has model_type={model_type!r}; expected {MODEL_TYPE!r} "
            "(NemotronH / Nemotron-3)"
        )

    values: dict[str, Any] = {}
    unknown = []
    for key, value in config.items():
        name = _ALIASES.get(key, key)
        if name in _REQUIRED_VALUES:
            required, why = _REQUIRED_VALUES[name]
            if value != required:
                raise ValueError(f"{key}={value!r}: {why}")
            continue
        if name in values and values[name] != value:
            raise ValueError(
                f"config.json sets {name} twice with different values "
                f"({values[name]!r} and {key}={value!r})"
            )
        if (name in _FIELDS and name not in _NOT_HF) or name in _PATTERN_LISTS:
            _check_type(key, name, value)
            values[name] = value
        elif name not in _IGNORED:
            unknown.append(key)
    if unknown:
        warnings.warn(
            f"config.json fields not known to torchtitan_nemotron3, ignored: {sorted(unknown)}",
            stacklevel=2,
        )

    pattern = values.pop("hybrid_override_pattern", None)
    block_types = values.pop("layers_block_type", None)
    if pattern is None and block_types is None:
        raise ValueError(
            "config.json has neither layers_block_type nor hybrid_override_pattern: "
            "the layer pattern is unknown"
        )
    if (
        pattern is not None
        and block_types is not None
        and parse_hybrid_pattern(pattern) != parse_hybrid_pattern(block_types)
    ):
        raise ValueError(
            f"hybrid_override_pattern {pattern!r} disagrees with layers_block_type "
            f"{block_types!r}"
        )
    values["hybrid_override_pattern"] = block_types if pattern is None else pattern
    mtp_pattern = values.pop("mtp_hybrid_override_pattern", None)
    mtp_block_types = values.pop("mtp_layers_block_type", None)
    if (
        mtp_pattern is not None
        and mtp_block_types is not None
        and parse_hybrid_pattern(mtp_pattern) != parse_hybrid_pattern(mtp_block_types)
    ):
        raise ValueError(
            f"mtp_hybrid_override_pattern {mtp_pattern!r} disagrees with "
            f"mtp_layers_block_type {mtp_block_types!r}"
        )
    if mtp_pattern is not None or mtp_block_types is not None:
        values["mtp_hybrid_override_pattern"] = (
            mtp_block_types if mtp_pattern is None else mtp_pattern
        )
    num_layers = config.get("num_hidden_layers")
    if num_layers is not None:
        values["num_hidden_layers"] = num_layers

    if values.get("time_step_limit") is not None:
        limit = values["time_step_limit"]
        if not isinstance(limit, (list, tuple)) or len(limit) != 2:
            raise ValueError(f"time_step_limit={limit!r}: expected [low, high]")
        values["time_step_limit"] = tuple(
            _decode_float(v, "time_step_limit") for v in limit
        )
    else:
        values.pop("time_step_limit", None)
    values.update(overrides)
    return NemotronHArgs(**values)


def _dtype_name(dtype: torch.dtype | str | None) -> str | None:
    if dtype is None or isinstance(dtype, str):
        return dtype
    return str(dtype).removeprefix("torch.")


def hf_config_from_args(
    args: NemotronHArgs, dtype: torch.dtype | str | None = None
) -> dict[str, Any]:
    """A ``config.json`` dict for ``args`` that transformers' ``AutoConfig`` /
    ``AutoModelForCausalLM`` load without ``trust_remote_code``.

    Writes ``layers_block_type`` (transformers 5.x) and also
    ``hybrid_override_pattern`` + ``num_hidden_layers`` (the hub's remote code);
    ``time_step_limit`` is written as given, though transformers' torch path clamps
    dt at ``time_step_min`` regardless.
    """
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "layers_block_type": to_hf_block_types(args.hybrid_override_pattern),
        "hybrid_override_pattern": args.hybrid_override_pattern,
        "mtp_layers_block_type": to_hf_block_types(args.mtp_hybrid_override_pattern),
    }
    for field in dataclasses.fields(NemotronHArgs):
        if field.name in _NOT_HF or field.name == "hybrid_override_pattern":
            continue
        value = getattr(args, field.name)
        if field.name == "time_step_limit":
            value = [_encode_float(float(v)) for v in value]
        config[field.name] = value
    config.update(
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        use_cache=True,
        mamba_proj_bias=args.use_bias,
    )
    if dtype is not None:
        config["dtype"] = _dtype_name(dtype)
    return dict(sorted(config.items()))


def write_hf_config(
    out_dir: str | os.PathLike,
    args: NemotronHArgs,
    dtype: torch.dtype | str | None = None,
) -> str:
    """Write ``config.json`` for ``args`` into ``out_dir`` (via a temporary file and
    a rename, so a reader never sees half of it); return its path."""
    path = os.path.join(os.fspath(out_dir), CONFIG_NAME)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(hf_config_from_args(args, dtype), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------ from our model


def _same_for_all(layers: list, symbol: str, what: str, extract) -> dict[str, Any]:
    """``extract(mixer)`` of the ``symbol`` layers, after checking it is the same for
    every such layer (config.json holds one size per layer kind). ``{}`` if none."""
    found = [extract(layer.mixer) for layer in layers if layer.layer_type == symbol]
    for i, values in enumerate(found[1:], 1):
        if values != found[0]:
            raise ValueError(
                f"{what} layer #{i} has {values}, unlike the first {what} layer "
                f"({found[0]}): config.json holds one size per layer kind"
            )
    return found[0] if found else {}


def _mamba_fields(m) -> dict[str, Any]:
    return dict(
        mamba_num_heads=m.num_heads,
        mamba_head_dim=m.head_dim,
        ssm_state_size=m.state_size,
        n_groups=m.n_groups,
        conv_kernel=m.conv1d.kernel_size,
        use_conv_bias=m.conv1d.bias,
        use_bias=m.in_proj.bias,
        chunk_size=m.chunk_size,
        time_step_limit=tuple(m.time_step_limit),
        time_step_min=m.time_step_min,
        time_step_max=m.time_step_max,
        time_step_floor=m.time_step_floor,
    )


def _attention_fields(a) -> dict[str, Any]:
    return dict(
        num_attention_heads=a.n_heads,
        num_key_value_heads=a.n_kv_heads,
        head_dim=a.head_dim,
    )


def _mlp_fields(m) -> dict[str, Any]:
    return dict(intermediate_size=m.up_proj.out_features, mlp_bias=m.up_proj.bias)


def _moe_fields(m) -> dict[str, Any]:
    router = m.router
    return dict(
        n_routed_experts=m.num_experts,
        num_experts_per_tok=router.top_k,
        moe_intermediate_size=m.routed_experts.inner_experts.hidden_dim,
        moe_shared_expert_intermediate_size=m.shared_experts.up_proj.out_features,
        n_group=router.num_expert_groups or 1,
        topk_group=router.num_limited_groups or 1,
        norm_topk_prob=router.route_norm,
        routed_scaling_factor=router.route_scale,
        load_balance_coeff=m.load_balance_coeff,
        moe_seq_aux_loss_coeff=m.seq_aux_loss_coeff,
        mlp_bias=m.shared_experts.up_proj.bias,
        moe_latent_size=(
            None if m.fc1_latent_proj is None else m.fc1_latent_proj.out_features
        ),
    )


def _mtp_fields(mtp) -> dict[str, Any]:
    """One stored MTP block with its pattern and depth; none when MTP is off."""
    if mtp is None:
        return {"num_nextn_predict_layers": 0}
    return {
        "num_nextn_predict_layers": 1,
        "mtp_hybrid_override_pattern": "".join(
            layer.layer_type for layer in mtp.layers
        ),
        "mtp_num_layers": mtp.num_depths,
        "mtp_loss_scaling_factor": mtp.loss_scaling_factor,
    }


def args_from_model_config(model_config) -> NemotronHArgs:
    """Recover ``NemotronHArgs`` from a built ``NemotronHModel.Config`` tree.

    Used to export a model whose flat args were not kept. Init-only fields that the
    module tree does not record (``rescale_prenorm_residual``) keep their defaults.
    """
    layers = model_config.layers
    kw: dict[str, Any] = dict(
        vocab_size=model_config.vocab_size,
        hidden_size=model_config.dim,
        hybrid_override_pattern=model_config.hybrid_override_pattern,
        layer_norm_epsilon=model_config.norm.eps,
    )
    init = (model_config.tok_embeddings.param_init or {}).get("weight")
    std = getattr(init, "keywords", {}).get("std")
    if std is not None:
        kw["initializer_range"] = std

    layer_kinds = (
        (MAMBA, "Mamba2", _mamba_fields),
        (ATTENTION, "attention", _attention_fields),
        (MLP, "MLP", _mlp_fields),
        (MOE, "MoE", _moe_fields),
    )
    mtp = getattr(model_config, "mtp", None)
    kw.update(_mtp_fields(mtp))
    if mtp is not None:
        layers = [*layers, *mtp.layers]  # the same sizes as the main layers
    for symbol, what, extract in layer_kinds:
        for name, value in _same_for_all(layers, symbol, what, extract).items():
            if name in kw and kw[name] != value:
                raise ValueError(
                    f"{name}: {what} layers use {value}, others {kw[name]}"
                )
            kw[name] = value
    return NemotronHArgs(**kw)
