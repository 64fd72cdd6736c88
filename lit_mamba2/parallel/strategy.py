"""The Lightning strategy for `trainer.strategy: fsdp`: FSDP2 over the 4-D mesh of a `parallel:` layout.

Lightning's ModelParallelStrategy (FSDP2, the model parallelised from outside in `configure_model`) with our mesh
(dp_replicate × dp_shard × cp × tp) in place of its 2-D one; the LightningModule reads it as
`trainer.strategy.parallel_mesh`. Checkpoints are sharded (torch.distributed.checkpoint: every rank writes its
shards, rank 0 Lightning's meta.pt) into a folder that resumes on any layout, written aside and renamed when
complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lit_mamba2.checkpoints import partial_path, previous_path
from lit_mamba2.parallel.dims import ParallelDims, ParallelMesh


class FSDP2Strategy(ModelParallelStrategy):
    def __init__(self, dp_replicate: int = 1, dp_shard: int = -1, cp: int = 1, tp: int = 1,
                 seq_len: int | None = None, **kwargs):
        super().__init__(save_distributed_checkpoint=True, **kwargs)
        self.degrees = dict(dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, tp=tp)
        self.seq_len = seq_len  # (for the layout line: the tokens each rank holds)
        self.parallel_mesh: ParallelMesh | None = None

    def setup_environment(self) -> None:
        self._setup_distributed()  # the process group (and the accelerator's environment)
        dims = ParallelDims.resolve(self.world_size, **self.degrees)
        self.parallel_mesh = dims.build_mesh(self.root_device.type)
        self._device_mesh = self.parallel_mesh.world
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh  # (Lightning's LightningModule.device_mesh)
        rank_zero_info(dims.describe(self.seq_len))

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        dp = self.parallel_mesh.dp
        return {"num_replicas": dp.size(), "rank": dp.get_local_rank()}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any = None) -> None:
        """Every rank writes its shards into a partial folder; once all have, rank 0 puts it in place of the
        previous checkpoint, so that a crash while writing leaves the previous one whole."""
        path = Path(self.broadcast(str(filepath)))
        partial, previous = partial_path(path), previous_path(path)
        if self.global_rank == 0 and partial.exists():  # left by a crash
            shutil.rmtree(partial)
        self.barrier("checkpoint_partial_clean")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("checkpoint_written")
        if self.global_rank == 0:
            if path.is_dir():
                path.rename(previous)
            elif path.exists():  # a single-file checkpoint of an earlier strategy
                path.unlink()
            partial.rename(path)
            shutil.rmtree(previous, ignore_errors=True)
        self.barrier("checkpoint_in_place")


# `L.Trainer(strategy="lit_mamba2_fsdp")` once this module is imported (`import lit_mamba2.lightning` imports it).
# Only our own name: "fsdp2" may become a name of Lightning's own, and "fsdp" is Lightning's FSDP1 strategy.
STRATEGY_NAME = "lit_mamba2_fsdp"


def _register() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    if STRATEGY_NAME not in StrategyRegistry:
        StrategyRegistry.register(STRATEGY_NAME, FSDP2Strategy,
                                  description="lit-mamba2's FSDP2 over its dp_replicate × dp_shard × cp × tp mesh")


_register()
