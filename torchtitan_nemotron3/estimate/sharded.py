"""The model as training would shard it, on the meta device in a fake world.

Runs the trainer's own steps up to the first forward: the package's config
checks, ``ParallelDims`` meshes on a fake process group of ``ngpu`` ranks (rank
0's view), the model config's ``update_from_config``, a meta build, then the
model spec's ``parallelize_fn`` (or ``pipelining_fn`` under PP, rank 0's stage).
Compile is not applied: it does not change shards.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

from .job import Job


def _fake_world(ngpu: int) -> None:
    """A fake process group of ``ngpu`` ranks seen from rank 0 (torch's "fake"
    backend, which TorchTitan's own ``comm.mode=fake_backend`` dry run uses)."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_backend() != "fake":
            raise RuntimeError("a dry run needs a process without a real process group")
        dist.destroy_process_group()  # an earlier dry run's
    dist.init_process_group("fake", rank=0, world_size=ngpu)


def _ac_config(ac: str):
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

    configs = {"none": None, "selective": SelectiveAC.Config(), "full": FullAC.Config()}
    return configs[ac]


def build_sharded(job: Job):
    """(parallelized meta model or first PP stage, model config, ParallelDims),
    exactly as the trainer builds them. Raises ``ValueError`` for a refused layout."""
    import torch
    from torchtitan.config import TORCH_DTYPE_MAP, CompileConfig, DebugConfig
    from torchtitan.distributed import ParallelDims

    from ..sharding import check_parallelism
    from ..train import cpu_compat

    model_config = copy.deepcopy(job.model_spec.model)
    check_parallelism(
        job.parallelism, model_config, world_size=job.ngpu, seq_len=job.training.seq_len
    )
    cpu_compat.apply()  # TorchTitan's device type: cpu on this machine
    _fake_world(job.ngpu)
    dims = ParallelDims.from_config(job.parallelism, job.ngpu)
    dims.build_mesh()
    runtime = SimpleNamespace(
        parallelism=job.parallelism, training=job.training, debug=DebugConfig()
    )
    model_config.update_from_config(config=runtime)
    with torch.device("meta"):
        torch.set_default_dtype(TORCH_DTYPE_MAP[job.training.dtype])
        try:
            model = model_config.build()
        finally:
            torch.set_default_dtype(torch.float32)
    kwargs = {
        "parallel_dims": dims,
        "training": job.training,
        "parallelism": job.parallelism,
        "compile_config": CompileConfig(enable=False),
        "ac_config": _ac_config(job.ac),
        "dump_folder": "/tmp/torchtitan_nemotron3_dry_run",
    }
    if dims.pp_enabled:
        if job.model_spec.pipelining_fn is None:
            raise ValueError(
                "pipeline parallelism: the model spec has no pipelining_fn"
            )
        from torchtitan.components.loss import CrossEntropyLoss

        _, parts, _, _ = job.model_spec.pipelining_fn(
            model,
            **kwargs,
            device=torch.device("meta"),
            model_config=model_config,
            parallelize_fn=job.model_spec.parallelize_fn,
            loss_fn=CrossEntropyLoss.Config(
                global_vocab_size=model_config.vocab_size
            ).build(),
        )
        model = parts[0]
    else:
        model = job.model_spec.parallelize_fn(model, **kwargs)
    return model, model_config, dims
