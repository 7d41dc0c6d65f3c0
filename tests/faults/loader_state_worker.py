"""One gloo rank of ``test_loader_state.py``'s all-ranks-stop test: load the
checkpoint through ``ResilientCheckpointManager.dcp_load`` with its per-rank
loader; exit 3 on ``LoaderStateError`` (printed), 0 if it loaded."""

import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from tests.faults.test_loader_state import per_rank_loader
from torchtitan_nemotron3.resilience.checkpoint import ResilientCheckpointManager
from torchtitan_nemotron3.resilience.loader_state import LoaderStateError


def main(rank: int, init_file: str, ckpt: str) -> int:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=60))  # fmt: skip
    manager = object.__new__(ResilientCheckpointManager)
    manager.states = {}
    try:
        manager.dcp_load({"dataloader": per_rank_loader(rank, 2), "x": torch.zeros(2)},
                         ckpt, False, False)  # fmt: skip
    except LoaderStateError as e:
        print(f"LoaderStateError: {e}", flush=True)
        return 3
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
