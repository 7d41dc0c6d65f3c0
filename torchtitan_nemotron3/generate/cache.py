"""What incremental decoding carries between tokens, per layer.

A Mamba2 layer needs a fixed amount whatever the length so far: the last K-1 conv
inputs and the SSM state, so one more token costs the same at position 10 as at
10,000. An attention layer needs every past key and value (its KV cache). MLP and
MoE layers are per token and carry nothing.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class MambaState:
    """``conv_BKX``: the last K-1 conv inputs (pre-conv xBC, oldest first, zeros
    before the sequence start, as the causal conv's left padding); ``ssm_BHPN``: the
    SSD state after the last token, fp32 (fp64 for fp64 models) like the scan's."""

    conv_BKX: torch.Tensor
    ssm_BHPN: torch.Tensor


class KVCache:
    """Keys and values ``(B, H_kv, T, P)`` in a buffer grown by doubling, so appending
    a token is amortised O(1) copies instead of a concatenation of the whole past."""

    def __init__(self, k_BHLP: torch.Tensor, v_BHLP: torch.Tensor, capacity: int = 0):
        Bsz, H, L, P = k_BHLP.shape
        capacity = max(capacity, L, 1)
        self._k_BHTP = k_BHLP.new_empty(Bsz, H, capacity, P)
        self._v_BHTP = v_BHLP.new_empty(Bsz, H, capacity, P)
        self.length = 0
        # Rows of a merged batch (``batch.py``) are left-padded to one length: False
        # marks a padding key, which no query may read. None: every key is real.
        self.valid_BT: torch.Tensor | None = None
        self.append(k_BHLP, v_BHLP)

    @property
    def capacity(self) -> int:
        return self._k_BHTP.size(2)

    def append(self, k_BHLP: torch.Tensor, v_BHLP: torch.Tensor) -> None:
        end = self.length + k_BHLP.size(2)
        if end > self.capacity:
            grow = max(end, 2 * self.capacity) - self.capacity
            self._k_BHTP = torch.cat(
                [
                    self._k_BHTP,
                    self._k_BHTP.new_empty(
                        *self._k_BHTP.shape[:2], grow, self._k_BHTP.size(3)
                    ),
                ],
                dim=2,
            )
            self._v_BHTP = torch.cat(
                [
                    self._v_BHTP,
                    self._v_BHTP.new_empty(
                        *self._v_BHTP.shape[:2], grow, self._v_BHTP.size(3)
                    ),
                ],
                dim=2,
            )
        if self.valid_BT is not None and end > self.valid_BT.size(1):
            self.valid_BT = F.pad(
                self.valid_BT, (0, end - self.valid_BT.size(1)), value=True
            )
        self._k_BHTP[:, :, self.length : end] = k_BHLP
        self._v_BHTP[:, :, self.length : end] = v_BHLP
        self.length = end

    def keys(self) -> torch.Tensor:
        return self._k_BHTP[:, :, : self.length]

    def values(self) -> torch.Tensor:
        return self._v_BHTP[:, :, : self.length]

    def mask(self) -> torch.Tensor | None:
        """SDPA's boolean ``attn_mask`` (B, 1, 1, T) hiding padding keys, or None."""
        if self.valid_BT is None:
            return None
        return self.valid_BT[:, None, None, : self.length]

    def select(self, rows_B: torch.Tensor) -> None:
        """Keep only the rows ``rows_B`` (finished rows leave a batch)."""
        self._k_BHTP = self._k_BHTP[rows_B]
        self._v_BHTP = self._v_BHTP[rows_B]
        if self.valid_BT is not None:
            self.valid_BT = self.valid_BT[rows_B]


@dataclass
class DecodeCache:
    """Per layer (by the model's layer name): a ``MambaState``, a ``KVCache``, or
    nothing; ``length``: tokens seen so far (prompt plus decoded); ``parts``: each
    Mamba mixer's ``MambaParts``, read once at prefill rather than at every step."""

    layers: dict[str, MambaState | KVCache | None] = field(default_factory=dict)
    length: int = 0
    parts: dict = field(default_factory=dict)
