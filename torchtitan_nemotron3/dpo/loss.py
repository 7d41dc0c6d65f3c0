"""The DPO objective (Rafailov et al. 2023) over packed rows.

Per pair, with sequence log-probabilities ``π`` of the policy and ``ρ`` of the
reference (sums over the reply's tokens)::

    z = β · ((π_c − ρ_c) − (π_r − ρ_r))
    L = −log σ(z)  +  w_nll · (−π_c / n_c)

(``w_nll``: the optional NLL of the chosen reply, per token, "RPO"-style.) The
rewards are ``β(π − ρ)``; the margin is their difference, the accuracy the share
of pairs whose chosen reward is the larger.

Log-probabilities come from the final hidden states in fp32, one sequence chunk at
a time with the chunk's logits recomputed in backward (never [B, L, V] at once: 131K
vocabulary), then summed per reply by ``dpo_segment`` (``data.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_logps(lm_head, h_BCD: torch.Tensor, labels_BC: torch.Tensor) -> torch.Tensor:
    logits_BCV = lm_head(h_BCD).float()
    logp_BCV = F.log_softmax(logits_BCV, dim=-1)
    scored_BC = labels_BC != IGNORE_INDEX
    logp_BC = logp_BCV.gather(-1, labels_BC.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(scored_BC, logp_BC, torch.zeros_like(logp_BC))


def token_logps(
    h_BLD: torch.Tensor, lm_head, labels_BL: torch.Tensor, chunk_len: int = 1024
) -> torch.Tensor:
    """log p(label) per token in fp32 [B, L], 0 where the label is ignored."""
    pieces = []
    for start in range(0, h_BLD.size(1), chunk_len):
        h_BCD = h_BLD[:, start : start + chunk_len]
        labels_BC = labels_BL[:, start : start + chunk_len]
        if torch.is_grad_enabled() and h_BCD.requires_grad:
            pieces.append(
                checkpoint(_chunk_logps, lm_head, h_BCD, labels_BC, use_reentrant=False)
            )
        else:
            pieces.append(_chunk_logps(lm_head, h_BCD, labels_BC))
    return torch.cat(pieces, dim=1)


def reply_logps(
    logp_BL: torch.Tensor, segment_BL: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and pair slot: the (chosen, rejected) log-probability sums
    ``[B, P, 2]`` and token counts ``[B, P, 2]`` (P = L // 2: a pair has at least
    two tokens). Empty slots are 0."""
    B, L = segment_BL.shape
    P = L // 2
    scored_BL = segment_BL >= 0
    index_BL = torch.where(scored_BL, segment_BL, torch.zeros_like(segment_BL))
    index_BL = index_BL + 2 * P * torch.arange(B, device=segment_BL.device)[:, None]
    sums = logp_BL.new_zeros(B * 2 * P)
    sums = sums.index_add(0, index_BL.flatten(), (logp_BL * scored_BL).flatten())
    counts = torch.zeros(B * 2 * P, dtype=torch.long, device=segment_BL.device)
    counts = counts.index_add(0, index_BL.flatten(), scored_BL.long().flatten())
    return sums.view(B, P, 2), counts.view(B, P, 2)


def slot_values(values_BL: torch.Tensor, segment_BL: torch.Tensor) -> torch.Tensor:
    """A per-token value constant over each reply (the pair's index) gathered into
    its slot ``[B, P, 2]``; -1 in empty slots."""
    B, L = segment_BL.shape
    P = L // 2
    scored_BL = segment_BL >= 0
    index_BL = torch.where(scored_BL, segment_BL, 2 * P)  # unscored: a dump column
    out = values_BL.new_full((B, 2 * P + 1), -1)
    out.scatter_(1, index_BL, torch.where(scored_BL, values_BL, -1))
    return out[:, : 2 * P].view(B, P, 2)


@dataclass(slots=True)
class DPOTerms:
    """Per-pair terms over the pairs present in a batch ([N] each)."""

    loss: torch.Tensor
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor

    @property
    def margin(self) -> torch.Tensor:
        return self.chosen_reward - self.rejected_reward

    @property
    def accuracy(self) -> torch.Tensor:
        return (self.chosen_reward > self.rejected_reward).float()


def dpo_terms(
    policy_N2: torch.Tensor,
    reference_N2: torch.Tensor,
    chosen_tokens_N: torch.Tensor,
    *,
    beta: float,
    nll_weight: float = 0.0,
) -> DPOTerms:
    """``[N, 2]`` (chosen, rejected) sequence log-probabilities → per-pair terms."""
    ratio_N2 = policy_N2 - reference_N2
    z_N = beta * (ratio_N2[:, 0] - ratio_N2[:, 1])
    loss_N = -F.logsigmoid(z_N)
    if nll_weight:
        loss_N = loss_N + nll_weight * (-policy_N2[:, 0] / chosen_tokens_N)
    rewards_N2 = beta * ratio_N2.detach()
    return DPOTerms(loss_N, rewards_N2[:, 0], rewards_N2[:, 1])
