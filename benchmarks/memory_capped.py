"""Train with the GPU's memory capped, to emulate a smaller card on a big one:
``torch.cuda.set_per_process_memory_fraction(GPU_MEM_GIB / total)`` before the
trainer starts (an allocation past the cap raises out-of-memory as it would on
the small card). Arguments are ``python -m torchtitan_nemotron3.train``'s.

    GPU_MEM_GIB=24 torchrun --nproc_per_node=1 benchmarks/memory_capped.py \\
        --config_file train_configs/nemotron3-nano-30B-qlora.toml --training.steps 3
"""

import os
import runpy

import torch

if __name__ == "__main__":
    cap = float(os.environ.get("GPU_MEM_GIB", "24"))
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    print(f"memory capped at {cap:g} of {total:.1f} GiB", flush=True)
    runpy.run_module("torchtitan_nemotron3.train", run_name="__main__")
