"""What a safetensors checkpoint directory holds, by hub tensor name.

One scan of the file headers (no tensor data) gives, for every hub name, the file,
the key inside it and, for transformers' 3-D expert tensors, the expert index.
``from_pretrained`` checks names and shapes against the model with it before
reading any data, and the DCP storage reader serves reads through it. Only
safetensors are read: pickled ``*.bin`` checkpoints can run code when loaded.
"""

import json
import os
import struct
from dataclasses import dataclass

import torch

from .errors import CorruptCheckpointError, listing, read_json
from .naming import hub_names_on_disk

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class StoredTensor:
    """Where one hub-named tensor lives on disk."""

    file: str  # absolute path
    key: str  # key inside the file
    expert: int | None  # index along dim 0 of a stacked (3-D) expert tensor
    shape: tuple[int, ...]  # shape of the hub tensor (the expert's, if stacked)
    dtype: torch.dtype


def safetensors_files(path: str | os.PathLike) -> list[str]:
    """The safetensors files of a checkpoint directory: those named by
    ``model.safetensors.index.json`` if present, else ``model.safetensors``, else
    every ``*.safetensors`` file. Raises ``FileNotFoundError`` saying what is there."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    index = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptCheckpointError(f"{index}: no weight_map")
        bad = [k for k, v in weight_map.items() if not isinstance(v, str)]
        if bad:
            raise CorruptCheckpointError(
                f"{index}: weight_map[{bad[0]!r}] is not a file name"
            )
        files = sorted(set(weight_map.values()))
        missing = [
            name for name in files if not os.path.isfile(os.path.join(path, name))
        ]
        if missing:
            raise FileNotFoundError(f"{index} names files that do not exist: {missing}")
        return [os.path.join(path, name) for name in files]
    single = os.path.join(path, SAFETENSORS_SINGLE)
    if os.path.isfile(single):
        return [single]
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if files:
        return [os.path.join(path, n) for n in files]
    pickled = sorted(n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth")))
    hint = (
        f" (found {pickled}: pickle checkpoints are not read, convert them to "
        "safetensors)"
        if pickled
        else ""
    )
    raise FileNotFoundError(f"no safetensors files in {path}{hint}")


def _unreadable(file: str, error: Exception) -> CorruptCheckpointError:
    """The error for a file safetensors refuses: for a truncated file whose header
    survives, it names the tensors cut off."""
    size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            if header_size > size - 8:  # garbage: do not read (or allocate) it
                raise ValueError("header larger than the file")
            header = json.loads(f.read(header_size))
        data_size = size - 8 - header_size
        cut = [
            key
            for key, info in header.items()
            if key != "__metadata__" and info["data_offsets"][1] > data_size
        ]
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError):
        cut = []
    if cut:
        return CorruptCheckpointError(
            f"{file}: truncated ({size} bytes); tensors cut off: {listing(cut)}"
        )
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return CorruptCheckpointError(f"{file}: not a readable safetensors file ({reason})")


def open_safetensors(file: str):
    """``safe_open(file)``, with ``CorruptCheckpointError`` naming the file (and
    the tensors cut off) instead of a bare ``SafetensorError``."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(file, framework="pt")
    except SafetensorError as e:
        raise _unreadable(file, e) from None


def scan_checkpoint(path: str | os.PathLike) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint by hub name (headers only)."""
    found: dict[str, StoredTensor] = {}
    for file in safetensors_files(path):
        with open_safetensors(file) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                view = f.get_slice(key)
                shape = tuple(view.get_shape())
                dtype = _DTYPES.get(view.get_dtype())
                if dtype is None:
                    raise ValueError(
                        f"{file}: {key} has unsupported dtype {view.get_dtype()}"
                    )
                for hub_name, expert in hub_names_on_disk(key, shape):
                    if hub_name in found:
                        other = found[hub_name]
                        raise ValueError(
                            f"{hub_name} is stored twice: as {other.key!r} in "
                            f"{os.path.basename(other.file)} and as {key!r} in "
                            f"{os.path.basename(file)}"
                        )
                    found[hub_name] = StoredTensor(
                        file=file,
                        key=key,
                        expert=expert,
                        shape=shape if expert is None else shape[1:],
                        dtype=dtype,
                    )
    return found


def read_stored(
    f, stored: StoredTensor, slices: tuple[slice, ...] = ()
) -> torch.Tensor:
    """Read ``stored`` (optionally a sub-block) from an open ``safe_open`` handle."""
    from safetensors import SafetensorError

    try:
        if stored.expert is None and not slices:
            return f.get_tensor(stored.key)
        view = f.get_slice(stored.key)
        if stored.expert is None:
            return view[slices]
        block = (slice(stored.expert, stored.expert + 1), *slices)
        return view[block][0]
    except SafetensorError as e:
        raise CorruptCheckpointError(
            f"{stored.file}: cannot read {stored.key} ({e})"
        ) from None


def check_finite(tensor: torch.Tensor, name: str, file: str) -> None:
    """``CorruptCheckpointError`` naming the tensor when it holds NaN or inf: a
    diverged or damaged checkpoint would otherwise only show as a NaN loss later."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise CorruptCheckpointError(
            f"{file}: {name} holds non-finite values (NaN or inf)"
        )


def check_tokenizer_files(path: str | os.PathLike) -> None:
    """The tokenizer files of an assets directory parse: ``tokenizer.json`` loads
    with ``tokenizers`` and the JSON side files are JSON objects; else
    ``CorruptCheckpointError`` naming the file (``tokenizers`` names none)."""
    path = os.fspath(path)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            read_json(file)
    file = os.path.join(path, "tokenizer.json")
    if os.path.isfile(file):
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(file)
        except Exception as e:  # tokenizers raises plain Exception
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise CorruptCheckpointError(
                f"{file}: not a readable tokenizer ({reason})"
            ) from None
