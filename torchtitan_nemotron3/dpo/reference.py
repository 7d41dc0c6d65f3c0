"""DPO's reference policy: the model with its LoRA adapters switched off, or
sequence log-probabilities computed once before training.

"Adapters off" is the reference only when the adapters start at zero (B = 0) on the
model they were added to: then base + adapters-off is exactly the starting policy.
After SFT adapters (or any run whose starting point is not the bare base) the
reference must be the starting policy itself, computed once, before the first
update, and kept: ``precomputed`` writes it to a safetensors file beside the run
(``<dump_folder>/dpo_reference/<split>.safetensors``), which a resumed run reads
back instead of recomputing with trained weights.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn


def lora_modules(model: nn.Module) -> list[nn.Module]:
    """TorchTitan's ``LoRALinear`` modules (they scale the adapter path by
    ``_lora_scaling``)."""
    return [m for m in model.modules() if hasattr(m, "_lora_scaling")]


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Every adapter's output scaled by 0 (``W x + 0 · B A x = W x``), restored after."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError(
            'dpo.reference = "adapters_off" needs LoRA adapters in the model (a LoRA '
            'converter in the job); use dpo.reference = "precomputed" otherwise'
        )
    saved = [m._lora_scaling for m in modules]
    try:
        for m in modules:
            m._lora_scaling = 0.0
        yield
    finally:
        for m, s in zip(modules, saved, strict=True):
            m._lora_scaling = s


class ReferenceTable:
    """Reference (chosen, rejected) log-probabilities by pair index, fp32 [N, 2]."""

    def __init__(self, logps_N2: torch.Tensor, fingerprint: str):
        self.logps_N2, self.fingerprint = logps_N2, fingerprint

    def lookup(self, pair_BP2: torch.Tensor) -> torch.Tensor:
        """``[B, P, 2]`` pair indices (-1: empty slot) → their reference log-probs."""
        index = pair_BP2[..., 0].clamp(min=0).to(self.logps_N2.device)
        if int(pair_BP2.max()) >= self.logps_N2.size(0):
            raise ValueError(
                f"DPO reference table has {self.logps_N2.size(0)} pairs; the data has "
                f"pair {int(pair_BP2.max())}: the table belongs to other data "
                "(delete it to recompute from the starting weights)"
            )
        return self.logps_N2[index].to(pair_BP2.device)

    def save(self, path: str) -> None:
        """Atomically: a crash leaves the old file or none, never half a table."""
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        logps_N2 = self.logps_N2.detach().float().contiguous().cpu()
        save_file(
            {"logps": logps_N2},
            tmp,
            metadata={"fingerprint": self.fingerprint, "sha256": _sha256(logps_N2)},
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, fingerprint: str) -> ReferenceTable:
        """The table saved at ``path``; one line naming the file for anything else
        (unreadable, another layout, values changed since the save: the table
        records the SHA-256 of its values, a few bytes a pair to hash)."""
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                names = sorted(f.keys())
                logps = f.get_tensor("logps") if names == ["logps"] else None
        except Exception as e:  # noqa: BLE001 (safetensors raises several kinds)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path}: not a DPO reference table ({first})") from None
        if logps is None:
            raise ValueError(f"{path}: not a DPO reference table (tensors {names}, expected 'logps')")
        found = meta.get("fingerprint")
        if found != fingerprint:
            raise ValueError(
                f"{path}: DPO reference table of other data or settings (fingerprint "
                f"{found!r}, this run {fingerprint!r}); delete it to recompute from "
                "the starting weights"
            )
        if logps.dtype != torch.float32 or logps.dim() != 2 or logps.size(1) != 2:
            raise ValueError(
                f"{path}: 'logps' is {logps.dtype} {list(logps.shape)}, not float32 [pairs, 2]"
            )
        if meta.get("sha256") != _sha256(logps):
            raise ValueError(
                f"{path}: 'logps' values differ from the SHA-256 recorded at save "
                f"({meta.get('sha256')!r}): corrupt; delete it to recompute from the "
                "starting weights"
            )
        return cls(logps, fingerprint)


def _sha256(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
