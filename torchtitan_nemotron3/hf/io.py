"""``from_pretrained`` / ``save_pretrained``: our model ↔ a hub-format directory.

Loading checks the whole checkpoint against the architecture in its
``config.json`` before reading any tensor data (names and shapes from the file
headers), builds the model on the meta device, allocates it once on ``device`` and
reads each tensor straight into its parameter (experts row by row), so peak memory
is one model. Saving writes what transformers' ``save_pretrained`` writes: hub
names, one 2-D tensor per expert, the router in fp32, ``config.json``, plus the
tokenizer files of ``assets_dir``.
"""

import os
from collections import defaultdict

import torch
from torch.distributed.tensor import DTensor
from torchtitan.protocols.module import Module

from torchtitan_nemotron3.model import NemotronHModel, build_model_config

from .config import args_from_hf_config, hf_config_from_args, load_hf_config
from .errors import CheckpointMismatchError, CorruptCheckpointError, listing
from .files import check_finite, open_safetensors, read_stored, scan_checkpoint
from .hub import MODEL_FILES, local_dir
from .naming import is_mtp, keep_fp32, ours_to_hub, packed_part, packed_parts
from .state_dict_adapter import NemotronHStateDictAdapter
from .writer import DEFAULT_MAX_SHARD_SIZE, write_hf_checkpoint


def check_checkpoint(
    expected: dict[str, tuple],
    found: dict[str, tuple],
    path: str,
    files: dict[str, str] | None = None,
) -> None:
    """Raise ``CheckpointMismatchError`` naming every missing tensor, unexpected
    tensor and shape mismatch (key, expected vs found) at once; both dicts map
    tensor names to shapes; ``files`` (name → file) names the file of each found
    tensor (a damaged name in one shard shows as unexpected, in that file)."""
    files = files or {}

    def at(n: str) -> str:
        return f"{n} (in {os.path.basename(files[n])})" if n in files else n

    missing = [n for n in expected if n not in found]
    unexpected = sorted(at(n) for n in found if n not in expected)
    mismatched = [
        f"{n}: expected {tuple(expected[n])}, found {tuple(found[n])}"
        + (f" (in {os.path.basename(files[n])})" if n in files else "")
        for n in expected
        if n in found and tuple(found[n]) != tuple(expected[n])
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {listing(missing)}")
    if unexpected:
        problems.append(
            f"unexpected tensors ({len(unexpected)}): {listing(unexpected)}"
        )
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {listing(mismatched)}")
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not match the architecture of its config.json: "
            + "; ".join(problems)
        )


def _args_of(path: str):
    """The architecture in ``path``'s config.json; a bad value is a
    ``CorruptCheckpointError`` (a ``ValueError``) naming the file and the key."""
    config = load_hf_config(path)
    try:
        return args_from_hf_config(config)
    except (CorruptCheckpointError, CheckpointMismatchError):
        raise
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:
        file = os.path.join(path, "config.json")
        raise CorruptCheckpointError(f"{file}: {type(e).__name__}: {e}") from None


def _build_on_meta(
    args, kernel_backend: str = "auto"
) -> tuple[NemotronHModel, NemotronHStateDictAdapter]:
    model_config = build_model_config(args, kernel_backend=kernel_backend)
    with torch.device("meta"):
        model = model_config.build()
    return model, NemotronHStateDictAdapter(model_config, None)


def from_pretrained(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    allow_non_finite: bool = False,
    kernel_backend: str = "auto",
    mtp_num_layers: int = 0,
) -> NemotronHModel:
    """Our ``NemotronHModel`` from a hub-format directory (``config.json`` plus
    ``model.safetensors`` or shards with ``model.safetensors.index.json``; the
    ``model.``-prefixed spelling with 3-D experts is accepted too), or from a Hub
    repo id (``owner/name``, through the Hugging Face cache).

    ``dtype`` defaults to the checkpoint's (that of ``lm_head.weight``); the router
    (gate weight and correction bias) is kept in fp32 either way, as transformers
    (5.24+) keeps it, whether stored in fp32 or bf16. Returned in eval mode, like
    transformers.

    Raises ``FileNotFoundError`` (no directory / config.json / safetensors, repo
    not available), ``ValueError`` (config.json of another model type or an
    unsupported value), ``CheckpointMismatchError`` (missing / unexpected tensors,
    shape mismatches) and ``CorruptCheckpointError`` (unreadable or truncated
    file, malformed JSON, NaN/inf in a weight unless ``allow_non_finite``).
    ``kernel_backend`` picks the Mamba2 ops as in ``model_registry``.

    ``mtp_num_layers`` > 0 turns multi-token prediction on (its stored block
    applied that many times) and needs the checkpoint's ``mtp.*`` tensors; with
    MTP off (the default) they are skipped, as transformers skips them.
    """
    path = local_dir(path, MODEL_FILES)
    args = _args_of(path)
    stored = scan_checkpoint(path)
    if mtp_num_layers and not any(is_mtp(n) for n in stored):
        raise CheckpointMismatchError(
            f"checkpoint {path} has no MTP (mtp.*) tensors, so it cannot be loaded "
            f"with mtp_num_layers={mtp_num_layers}; load it with MTP off "
            "(mtp_num_layers=0)"
        )
    args = args.replace(mtp_num_layers=mtp_num_layers)
    model, adapter = _build_on_meta(args, kernel_backend)
    if model.mtp is None:
        stored = {n: entry for n, entry in stored.items() if not is_mtp(n)}
    expected = {n: t.shape for n, t in adapter.to_hf(model.state_dict()).items()}
    check_checkpoint(
        expected,
        {n: s.shape for n, s in stored.items()},
        path,
        files={n: s.file for n, s in stored.items()},
    )

    if dtype is None:
        dtype = stored["lm_head.weight"].dtype
    model.to_empty(device=device)
    model.to(dtype)
    router_gates = {
        n.rpartition(".")[0] for n, _ in model.named_parameters() if keep_fp32(n)
    }
    for name in router_gates:
        model.get_submodule(name).float()
    with torch.no_grad():
        # Non-persistent buffers (MoE token counters) are not in the checkpoint;
        # this also recreates the correction bias in fp32 before it is loaded.
        for module in model.modules():
            if isinstance(module, Module):
                module._init_self_buffers()
        # Views into the parameters: reading into them loads the model in place
        # (except the packed Mamba2 tensors, copies split back below).
        state = model.state_dict()
        targets = adapter.to_hf(state)
        by_file = defaultdict(list)
        for name, entry in stored.items():
            by_file[entry.file].append(name)

        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(stored), unit="tensor", desc="loading safetensors")
        for file, names in by_file.items():
            with open_safetensors(file) as f:
                for name in names:
                    targets[name].copy_(read_stored(f, stored[name]))
                    if not allow_non_finite:
                        check_finite(targets[name], name, file)
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        packed = {n: t for n, t in targets.items() if packed_parts(n) is not None}
        for name, value in adapter.from_hf(packed).items():
            state[name].copy_(value)
    model.eval()
    return model


def save_pretrained(
    model: NemotronHModel,
    out_dir: str | os.PathLike,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype | None = None,
    args=None,
    progress: bool = False,
    assets_dir: str | os.PathLike | None = None,
) -> None:
    """Write ``model`` as a hub-format checkpoint transformers loads
    (``AutoModelForCausalLM.from_pretrained(out_dir)``), atomically.

    ``max_shard_size`` (bytes or ``"5GB"``-style) splits the weights into
    ``model-0000i-of-0000N.safetensors`` files plus an index; ``dtype`` casts
    floating tensors (the router stays fp32); ``args`` (NemotronHArgs) defaults to
    what the model's config tree records. ``assets_dir`` (a directory or Hub repo
    id, typically the checkpoint the model came from) supplies the tokenizer, chat
    template and generation config files, copied where present.
    """
    from .config import args_from_model_config

    state_dict = model.state_dict()
    if any(isinstance(v, DTensor) for v in state_dict.values()):
        raise ValueError(
            "save_pretrained needs an unsharded model; for an FSDP-sharded model use "
            "TorchTitan's checkpoint.last_save_in_hf (NemotronHStateDictAdapter) or "
            "scripts/convert_checkpoint.py on a DCP checkpoint"
        )
    if args is None:
        args = args_from_model_config(model.config)
    adapter = NemotronHStateDictAdapter(model.config, None)

    def out_dtype(hub: str, value: torch.Tensor) -> torch.dtype:
        if keep_fp32(hub):
            return torch.float32
        return dtype if dtype is not None and value.is_floating_point() else value.dtype

    # Hub tensor → the keys of ours it is made of (several for a packed one).
    owners = defaultdict(list)
    for key in state_dict:
        part = packed_part(key)
        owners[part[0] if part else ours_to_hub(key)].append(key)
    owner, hub_meta = {}, {}
    for keys in dict.fromkeys(tuple(k) for k in owners.values()):
        meta = {key: state_dict[key].to("meta") for key in keys}
        for hub, t in adapter.to_hf(meta).items():
            owner[hub] = keys
            hub_meta[hub] = torch.empty(t.shape, dtype=out_dtype(hub, t), device="meta")

    def fetch(names: list[str]) -> dict[str, torch.Tensor]:
        wanted, out = set(names), {}
        for keys in dict.fromkeys(owner[n] for n in names):
            for hub, value in adapter.to_hf({k: state_dict[k] for k in keys}).items():
                if hub in wanted:
                    value = value.detach().to("cpu", out_dtype(hub, value))
                    out[hub] = value.contiguous()
        return out

    write_hf_checkpoint(
        out_dir,
        hf_config_from_args(args, dtype or state_dict["lm_head.weight"].dtype),
        hub_meta,
        fetch,
        max_shard_size=max_shard_size,
        progress=progress,
        assets_dir=assets_dir,
    )
