"""The degrees of a layout and the mesh sizes TorchTitan derives from them.

Mirrors ``ParallelDims.build_mesh`` (dense mesh pp×dp_replicate×fsdp×tp, sparse
mesh pp×dp_replicate×efsdp×ep) so that analytic estimates size the same meshes
the trainer builds, without a process group.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    world: int
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever the other degrees leave
    cp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1

    @classmethod
    def from_parallelism(cls, parallelism, world: int) -> "Layout":
        p = parallelism
        return cls(
            world=world,
            dp_replicate=p.data_parallel_replicate_degree,
            dp_shard=p.data_parallel_shard_degree,
            cp=p.context_parallel_degree,
            tp=p.tensor_parallel_degree,
            pp=p.pipeline_parallel_degree,
            ep=p.expert_parallel_degree,
        )

    @property
    def shard(self) -> int:
        """``dp_shard`` with -1 resolved as ParallelDims does."""
        if self.dp_shard > 0:
            return self.dp_shard
        return self.world // (self.dp_replicate * self.cp * self.tp * self.pp)

    @property
    def fsdp(self) -> int:
        """Dense parameters are sharded over dp_shard × cp."""
        return self.shard * self.cp

    @property
    def efsdp(self) -> int:
        """Experts: EP borrows ranks from fsdp × tp; the rest shard the experts."""
        return self.fsdp * self.tp // self.ep

    def name(self) -> str:
        parts = [
            f"{k}{v}"
            for k, v in (
                ("PP", self.pp),
                ("HSDP", self.dp_replicate),
                ("TP", self.tp),
                ("CP", self.cp),
                ("EP", self.ep),
            )
            if v > 1
        ]
        return "+".join([*parts, f"FSDP{self.fsdp}"])

    def parallelism_kwargs(self) -> dict:
        """As ``ParallelismConfig`` fields."""
        return {
            "data_parallel_replicate_degree": self.dp_replicate,
            "data_parallel_shard_degree": self.dp_shard,
            "context_parallel_degree": self.cp,
            "tensor_parallel_degree": self.tp,
            "pipeline_parallel_degree": self.pp,
            "expert_parallel_degree": self.ep,
        }
