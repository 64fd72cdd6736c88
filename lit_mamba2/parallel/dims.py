"""The parallel layout: degrees of data (replicated × sharded), context and tensor parallelism, and their mesh."""

from __future__ import annotations

from dataclasses import dataclass

NAMES = ("dp_replicate", "dp_shard", "cp", "tp")


class LayoutError(ValueError):
    """A parallel layout that does not fit the world size; the message names the degrees."""


@dataclass(frozen=True)
class ParallelDims:
    """dp_replicate × dp_shard × cp × tp ranks (outermost first: tp groups are neighbouring ranks, so that tensor
    parallelism stays inside a node). `resolve` fills a -1 with what is left of the world size."""

    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1

    @classmethod
    def resolve(cls, world_size: int, dp_replicate: int = 1, dp_shard: int = -1, cp: int = 1,
                tp: int = 1) -> "ParallelDims":
        degrees = dict(dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, tp=tp)
        for name, d in degrees.items():
            if not isinstance(d, int) or isinstance(d, bool) or d == 0 or d < -1:
                raise LayoutError(f"parallel.{name} must be a positive integer or -1 (what is left), got {d!r}")
        free = [n for n, d in degrees.items() if d == -1]
        if len(free) > 1:
            raise LayoutError(f"only one parallel degree may be -1, got {', '.join('parallel.' + n for n in free)}")
        fixed = 1
        for d in degrees.values():
            fixed *= max(d, 1)
        layout = " × ".join(f"{n}={d}" for n, d in degrees.items())
        if free:
            if world_size % fixed:
                raise LayoutError(f"parallel layout {layout} does not divide the world size {world_size} "
                                  f"({fixed} does not divide it)")
            degrees[free[0]] = world_size // fixed
        elif fixed != world_size:
            raise LayoutError(f"parallel layout {layout} = {fixed} ranks, but the world size is {world_size}")
        return cls(**degrees)

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that read different samples."""
        return self.dp_replicate * self.dp_shard

    def describe(self, seq_len: int | None = None) -> str:
        line = (f"parallel layout: dp_replicate={self.dp_replicate} dp_shard={self.dp_shard} cp={self.cp} "
                f"tp={self.tp} (world {self.world_size})")
        return line if seq_len is None else f"{line}, tokens per rank {seq_len // self.cp} of {seq_len} per row"

    def build_mesh(self, device_type: str) -> "ParallelMesh":
        """The 4-D mesh named dp_replicate, dp_shard, cp, tp, and the submeshes the layers use."""
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard, self.cp, self.tp),
                                mesh_dim_names=NAMES)
        # data loading: dp_replicate × dp_shard; FSDP shards over the cp ranks too (they hold the same parameters)
        # and replicates over dp_replicate (HSDP when > 1)
        dp = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        shard = mesh["dp_shard"] if self.cp == 1 else mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        if self.dp_replicate == 1:
            fsdp = shard
        elif self.cp == 1:
            fsdp = mesh["dp_replicate", "dp_shard"]
        else:
            raise NotImplementedError("dp_replicate > 1 together with cp > 1 (HSDP over context-parallel ranks)")
        return ParallelMesh(self, mesh, dp, fsdp)

    def data_rank(self, rank: int) -> int:
        """The data-parallel rank of a global rank (ranks of one cp or tp group read the same samples)."""
        return rank // (self.cp * self.tp)


@dataclass(frozen=True)
class ParallelMesh:
    """The device mesh of a layout: `world` (4-D), `dp` (1-D: ranks that read different samples), `fsdp` (what
    FSDP2 shards over: 1-D, or 2-D (replicate, shard) for HSDP)."""

    dims: ParallelDims
    world: object
    dp: object
    fsdp: object

