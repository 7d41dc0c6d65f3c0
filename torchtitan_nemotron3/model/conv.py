"""Mamba2's short causal depthwise convolution, in plain torch, packed-aware."""

import torch
import torch.nn.functional as F


def causal_conv1d(
    x_BLC: torch.Tensor,
    weight_CK: torch.Tensor,
    bias_C: torch.Tensor | None,
    seq_idx_BL: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y_t = bias + sum_k weight[:, k] * x_{t-(K-1)+k}``, each channel on its own.

    Without documents this is one ``F.conv1d``. With ``seq_idx`` the K taps are
    summed explicitly and a tap reading a token of an earlier document is dropped,
    exactly as if each document had been convolved alone (zero left padding).
    """
    L, C = x_BLC.shape[1:]
    K = weight_CK.size(-1)
    if seq_idx_BL is None:
        y_BCL = F.conv1d(
            x_BLC.transpose(1, 2), weight_CK[:, None, :], bias_C, padding=K - 1, groups=C
        )
        return y_BCL[..., :L].transpose(1, 2)

    x_pad_BLC = F.pad(x_BLC, (0, 0, K - 1, 0))
    seq_pad_BL = F.pad(seq_idx_BL, (K - 1, 0), value=-1)
    y_BLC = torch.zeros_like(x_BLC) if bias_C is None else bias_C.expand_as(x_BLC)
    for k in range(K):
        same_doc_BL1 = (seq_pad_BL[:, k : k + L] == seq_idx_BL)[..., None]
        tap_BLC = x_pad_BLC[:, k : k + L] * weight_CK[:, k]
        y_BLC = y_BLC + torch.where(same_doc_BL1, tap_BLC, 0.0)
    return y_BLC
