"""Mamba2's short causal depthwise convolution, in plain torch, packed-aware."""

import torch
import torch.nn.functional as F


def causal_conv1d(
    x_BLX: torch.Tensor,
    weight_XK: torch.Tensor,
    bias_X: torch.Tensor | None,
    seq_idx_BL: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y_t = bias + sum_k weight[:, k] * x_{t-(K-1)+k}``, each channel on its own.

    Without documents this is one ``F.conv1d``. With ``seq_idx`` the K taps are
    summed explicitly and a tap reading a token of an earlier document is dropped,
    exactly as if each document had been convolved alone (zero left padding).
    """
    L, X = x_BLX.shape[1:]
    K = weight_XK.size(-1)
    if seq_idx_BL is None:
        y_BXL = F.conv1d(
            x_BLX.transpose(1, 2), weight_XK[:, None, :], bias_X, padding=K - 1, groups=X
        )
        return y_BXL[..., :L].transpose(1, 2)

    x_pad_BLX = F.pad(x_BLX, (0, 0, K - 1, 0))
    seq_pad_BL = F.pad(seq_idx_BL, (K - 1, 0), value=-1)
    y_BLX = torch.zeros_like(x_BLX) if bias_X is None else bias_X.expand_as(x_BLX)
    for k in range(K):
        same_doc_BL1 = (seq_pad_BL[:, k : k + L] == seq_idx_BL)[..., None]
        tap_BLX = x_pad_BLX[:, k : k + L] * weight_XK[:, k]
        y_BLX = y_BLX + torch.where(same_doc_BL1, tap_BLX, 0.0)
    return y_BLX
