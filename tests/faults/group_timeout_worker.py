"""One of 4 gloo ranks of ``test_faults.py``'s mesh-group test: the process group
with a 5 s init timeout, then TorchTitan's 2 × 2 device mesh (its groups are
created after the default one); rank 3 never gets there. Prints ``<rank> <what>
<seconds>``: ``built`` or the exception's type (gloo: a store or connect timeout) and how
long the mesh took."""

import sys
import time
from datetime import timedelta
from types import SimpleNamespace

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh


def main(rank: int, init_file: str, bound: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=4, timeout=timedelta(seconds=5))  # fmt: skip
    if bound:
        from torchtitan_nemotron3.resilience.hooks import bound_new_group_timeouts

        bound_new_group_timeouts(SimpleNamespace(init_timeout_seconds=5))
    if rank == 3:
        time.sleep(3600)
    begin = time.monotonic()
    try:
        init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        what = "built"
    except Exception as e:  # noqa: BLE001 (the test reads which)
        what = type(e).__name__
    print(rank, what, round(time.monotonic() - begin, 1), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1")
