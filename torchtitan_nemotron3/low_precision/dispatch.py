"""TorchTitan's padded token dispatcher, with a padded permute that also runs on CPU.

``TorchAOTokenDispatcher`` pads every local expert's token group to a multiple of
``pad_multiple`` (what quantized grouped GEMMs need) through torchao's
``permute_and_pad``, whose index kernel is Triton only: on CPU it fails ("0 active
drivers") unless the whole process runs Triton's interpreter. On CPU tensors this
subclass builds the same indices with torch ops (no loop over experts, no host
sync, so it also compiles); on GPUs it is TorchTitan's unchanged.
"""

from dataclasses import dataclass

import torch
from torchtitan.models.common.token_dispatcher import TorchAOTokenDispatcher


def padded_permute_indices(
    tokens_per_expert_group: torch.Tensor,
    experts_per_rank: int,
    num_ranks: int,
    max_len: int,
    alignment: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's ``generate_permute_indices`` contract: rows arrive rank-major
    (rank r, then its local experts e); the result lists, expert-major, each
    expert's rows from every rank, then ``-1`` (the zero sentinel row) up to the
    expert's padded size ``max(count, alignment)`` rounded up to ``alignment``.
    Returns ``(permuted_indices [max_len], padded sizes [experts_per_rank])``."""
    counts_RE = tokens_per_expert_group.view(num_ranks, experts_per_rank).long()
    sizes_E = counts_RE.sum(0).clamp_min(alignment)
    sizes_E = (sizes_E + alignment - 1) // alignment * alignment
    write_start_E = torch.cumsum(sizes_E, 0) - sizes_E
    # Where rank r's block of expert e goes: the expert's start plus the rows of
    # that expert from ranks before r.
    dest_start_RE = write_start_E[None, :] + torch.cumsum(counts_RE, 0) - counts_RE
    counts = counts_RE.reshape(-1)
    src_start = torch.cumsum(counts, 0) - counts
    n = counts.sum()
    rows = torch.arange(max_len, device=counts.device)
    group = torch.searchsorted(torch.cumsum(counts, 0), rows, right=True)
    valid = rows < n
    group = group.clamp(max=counts.numel() - 1)
    dest = dest_start_RE.reshape(-1)[group] + rows - src_start[group]
    dest = torch.where(valid, dest, max_len)  # rows past the input: dropped
    indices = torch.full((max_len + 1,), -1, dtype=torch.int32, device=counts.device)
    indices = indices.scatter(0, dest, rows.to(torch.int32))
    return indices[:max_len], sizes_E.to(torch.int32)


class PaddedTokenDispatcher(TorchAOTokenDispatcher):
    """``TorchAOTokenDispatcher``; on CPU the padded permute is ``padded_permute_indices``."""

    @dataclass(kw_only=True, slots=True)
    class Config(TorchAOTokenDispatcher.Config):
        pass

    def _permute(self, routed_input_RD, num_global_tokens_per_local_expert_E):
        if routed_input_RD.device.type != "cpu":
            return super()._permute(routed_input_RD, num_global_tokens_per_local_expert_E)
        ep_size = self.ep_mesh.size() if self.ep_mesh is not None else 1
        e = num_global_tokens_per_local_expert_E.shape[0] // ep_size
        # torchao's bound on the padded rows.
        m = self.pad_multiple
        max_len = (routed_input_RD.shape[0] + e * m + m - 1) // m * m
        with torch.no_grad():
            indices, sizes_E = padded_permute_indices(
                num_global_tokens_per_local_expert_E, e, ep_size, max_len, m
            )
        sentinel_1D = routed_input_RD.new_zeros((1, routed_input_RD.shape[-1]))
        x_RD = torch.vstack((routed_input_RD, sentinel_1D))
        input_shape = x_RD.shape
        return input_shape, x_RD[indices, :], indices, sizes_E
