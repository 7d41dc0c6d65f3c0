"""torchao's NF4 (4-bit NormalFloat, double-quantized scalers) with a legal block
size per tensor.

``to_nf4(t, block_size=64, scaler_block_size=256)`` takes 2-D tensors whose element
count is a multiple of 64 and whose number of 64-blocks is a multiple of
``scaler_block_size``. 256 fails on some NemotronH shapes (one Nano expert
1856×2688: 77,952 blocks; Mamba's ``in_proj.dt`` 64×2688: 2,688 blocks; the debug
model's ``dt`` 8×256: 32 blocks), so each tensor gets the largest power of two
≤ 256 that divides its block count (``scaler_block_size``); a tensor whose size is
not a multiple of 64 is refused by name. Routed experts [E, F, D] are quantized as
their [E·F, D] view: F·D is a multiple of 64, so no block crosses two experts.

``dequantize_rows`` dequantizes a range of rows with torchao's own arithmetic
(bitwise what ``get_original_weight`` gives for those rows): the chunked expert
GEMM dequantizes a few experts at a time.
"""

import math

import torch

try:  # torchao >= 0.18 (pytorch/ao#4256 moved it)
    from torchao.quantization import NF4Tensor, to_nf4
except ImportError:  # pragma: no cover - older torchao
    try:
        from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4
    except ImportError:
        NF4Tensor = to_nf4 = None

BLOCK_SIZE = 64  # elements per absmax scaler (QLoRA's)
MAX_SCALER_BLOCK = 256  # scalers per double-quantization factor (torchao's default)


def require_torchao() -> None:
    if to_nf4 is None:
        raise ImportError(
            "base_dtype='nf4' needs torchao (NF4): pip install -e '.[qlora]'"
        )


def scaler_block_size(numel: int, name: str, shards: int = 1) -> int:
    """The largest power of two ≤ 256 dividing ``numel / 64 / shards`` (so each of
    ``shards`` FSDP shards holds whole scaler blocks); ``ValueError`` naming
    ``name`` when ``numel`` is not a multiple of 64 (or of 64 · ``shards``)."""
    if numel <= 0 or numel % BLOCK_SIZE:
        raise ValueError(
            f"NF4: {name} has {numel} elements, not a positive multiple of "
            f"{BLOCK_SIZE}; leave it out of the NF4 base"
        )
    n_blocks = numel // BLOCK_SIZE
    if n_blocks % shards:
        raise ValueError(
            f"NF4: {name} has {n_blocks} blocks of {BLOCK_SIZE}, not divisible "
            f"into {shards} shards"
        )
    size = MAX_SCALER_BLOCK
    while (n_blocks // shards) % size:
        size //= 2
    return size


def shardable(shape: tuple, shards: int) -> bool:
    """Whether FSDP2 can shard an NF4 tensor of ``shape`` (3-D: its [E·F, D]
    view) into ``shards`` equal row chunks of whole 64-blocks: torchao splits
    codes, scalers and factors alike (``aten.split``), so the rows and the
    block count must divide evenly; the scaler block is then chosen to
    divide too (``scaler_block_size(..., shards)``)."""
    rows = math.prod(shape[:-1])
    numel = rows * shape[-1]
    return (
        rows % shards == 0
        and numel % BLOCK_SIZE == 0
        and (numel // BLOCK_SIZE) % shards == 0
    )


def nf4_nbytes(numel: int, scaler_block: int, scale_bytes: int = 2) -> int:
    """Bytes of an NF4 tensor: 4-bit codes, one int8 scaler per 64 elements, one
    factor (in the original dtype) per scaler block, one scalar mean."""
    n_blocks = numel // BLOCK_SIZE
    return numel // 2 + n_blocks + (n_blocks // scaler_block) * scale_bytes + scale_bytes


def tensor_nbytes(t: torch.Tensor) -> int:
    """Storage bytes of a plain or NF4 tensor."""
    if NF4Tensor is not None and isinstance(t, NF4Tensor):
        inner = (t.quantized_data, t.quantized_scalers, t.quantization_factor, t.scaler_mean)
        return sum(x.numel() * x.element_size() for x in inner)
    return t.numel() * t.element_size()


def quantize(t: torch.Tensor, name: str) -> "NF4Tensor":
    """``to_nf4`` of ``t`` (2-D, or 3-D experts as [E·F, D]) with the block size of
    ``scaler_block_size``; ``t`` is read, not changed."""
    require_torchao()
    if t.dim() == 3:
        t = t.reshape(-1, t.shape[-1])
    if t.dim() != 2:
        raise ValueError(f"NF4: {name} has shape {tuple(t.shape)}; 2-D or 3-D only")
    sbs = scaler_block_size(t.numel(), name)
    return to_nf4(t.detach().contiguous(), BLOCK_SIZE, sbs)


def quantize_in_chunks(
    t: torch.Tensor, name: str, rows: int = 0, scaler_block: int | None = None
) -> "NF4Tensor":
    """``quantize(t, name)`` bitwise, with temporaries of ``rows`` rows at a time
    instead of torchao's whole-tensor copies (the codes of each 64-block depend
    on that block's absmax only; the double-quantized scalers, 1/64 of the
    size, are computed over the whole tensor as ``to_nf4`` does). ``rows`` = 0:
    one expert's worth for a 3-D bank, else 1/8 of the tensor. ``scaler_block``:
    the placeholder's (an FSDP-sharded one's may be smaller than the default)."""
    require_torchao()
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import (
        SubclassTensorArgs,
    )

    if t.dim() == 3:
        rows = rows or t.shape[1]
        t = t.reshape(-1, t.shape[-1])
    if t.dim() != 2:
        raise ValueError(f"NF4: {name} has shape {tuple(t.shape)}; 2-D or 3-D only")
    sbs = scaler_block or scaler_block_size(t.numel(), name)
    rows = rows or max(1, -(-t.shape[0] // 8))
    if (rows * t.shape[1]) % BLOCK_SIZE:
        rows = t.shape[0]  # chunks must hold whole blocks
    t = t.detach().contiguous()
    scalers, factor, mean = _double_quantized_scalers(t, rows, sbs)
    nf4 = torch.tensor(_NF4_LEVELS, device=t.device, dtype=t.dtype)
    data = torch.empty(t.numel() // 2, dtype=torch.uint8, device=t.device)
    for r0 in range(0, t.shape[0], rows):
        part = t[r0 : r0 + rows]
        n_blocks = part.numel() // BLOCK_SIZE
        e0 = r0 * t.shape[1]
        data[e0 // 2 : (e0 + part.numel()) // 2] = (
            NF4Tensor.convert_to_norm_float_weight(part, n_blocks, BLOCK_SIZE, nf4)
        )
    meta = SubclassTensorArgs(
        t.size(), t.stride(), t.storage_offset(), t.dtype, t.device, False
    )
    return NF4Tensor(
        meta, BLOCK_SIZE, t.numel() // BLOCK_SIZE, sbs, scalers, factor, mean, data,
        nf4=nf4,
    )


def _double_quantized_scalers(t: torch.Tensor, rows: int, sbs: int):
    """torchao's ``double_quantize_scalers`` (same arithmetic, same result) with
    each block's absmax taken ``rows`` rows at a time: no whole-tensor |t| copy."""
    absmax = torch.cat(
        [
            t[r0 : r0 + rows].reshape(-1, BLOCK_SIZE).abs().max(dim=1).values
            for r0 in range(0, t.shape[0], rows)
        ]
    )
    mean = absmax.mean()
    centred = absmax - mean
    n_scaler_blocks = centred.numel() // sbs
    blocks = centred.view(n_scaler_blocks, sbs)
    block_absmax = centred.view(n_scaler_blocks, sbs).abs().max(dim=1).values
    factor = 256 / (2 * block_absmax.unsqueeze(-1).expand(n_scaler_blocks, sbs))
    quantized = (blocks * factor).round().clamp(-128, 127)
    return (
        quantized.flatten().to(torch.int8),
        factor[:, 0].view(n_scaler_blocks).contiguous(),
        mean,
    )


def nf4_placeholder(
    shape: tuple, name: str, device="meta", shards: int = 1
) -> "NF4Tensor":
    """An empty NF4 tensor of ``shape`` (3-D experts: their [E·F, D] view) with
    ``quantize``'s block sizes: the storage layout without quantizing anything
    (on meta, torchao's quantization loop would still run per chunk);
    ``shards``: the FSDP degree its scaler blocks must divide into."""
    require_torchao()
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import (
        SubclassTensorArgs,
    )

    rows_cols = (math.prod(shape[:-1]), shape[-1])
    numel = math.prod(rows_cols)
    sbs = scaler_block_size(numel, name, shards)
    n_blocks = numel // BLOCK_SIZE
    bf16 = torch.bfloat16
    empty = lambda n, dt: torch.empty(n, dtype=dt, device=device)  # noqa: E731
    meta = SubclassTensorArgs(
        torch.Size(rows_cols), (rows_cols[1], 1), 0, bf16, torch.device(device), False
    )
    return NF4Tensor(
        meta, BLOCK_SIZE, n_blocks, sbs, empty(n_blocks, torch.int8),
        empty(n_blocks // sbs, bf16), empty((), bf16), empty(numel // 2, torch.uint8),
        nf4=torch.tensor(_NF4_LEVELS, dtype=bf16, device=device),
    )


# torchao's NF4 code book (``NF4Tensor.from_tensor``).
_NF4_LEVELS = [
    -1.0000, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0000,
    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0000,
]  # fmt: skip


def dequantize_rows(
    w: "NF4Tensor", start: int, end: int, scalers: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows ``[start, end)`` of ``w`` dequantized, in ``w``'s original dtype:
    ``get_original_weight`` restricted to those rows (same operations, so the
    full range is bitwise ``w.get_original_weight()``). The row range must hold
    whole 64-blocks. ``scalers``: ``all_scalers(w)``, when dequantizing several
    ranges of one tensor."""
    cols = w.shape[1]
    e0, e1 = start * cols, end * cols
    if e0 % w.block_size or e1 % w.block_size:
        raise ValueError(
            f"NF4 rows [{start}, {end}) of a {tuple(w.shape)} tensor split a "
            f"{w.block_size}-element block"
        )
    data = w.quantized_data[e0 // 2 : e1 // 2]
    first = w.dequantize((data >> 4).to(torch.long), w.nf4)
    second = w.dequantize((data & 0b1111).to(torch.long), w.nf4)
    if scalers is None:
        scalers = all_scalers(w)
    scalers = scalers[e0 // w.block_size : e1 // w.block_size]
    repeated = scalers.unsqueeze(-1).expand(scalers.size(0), w.block_size // 2)
    first = (first * repeated.flatten()).unsqueeze(-1).transpose(0, 1)
    second = (second * repeated.flatten()).unsqueeze(-1).transpose(0, 1)
    return torch.stack([first, second], dim=-1).reshape(end - start, cols)


def all_scalers(w: "NF4Tensor") -> torch.Tensor:
    """Every 64-block's dequantized absmax scaler of ``w`` (1/64 of its size)."""
    return w.dequantize_scalers(
        w.quantized_scalers, w.quantization_factor, w.scaler_block_size
    )
