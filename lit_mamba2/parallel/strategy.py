"""The Lightning strategy for `trainer.strategy: fsdp`: FSDP2 over the 4-D mesh of a `parallel:` layout.

Lightning's ModelParallelStrategy (FSDP2, the model parallelised from outside in `configure_model`) with our mesh
(dp_replicate × dp_shard × cp × tp) in place of its 2-D one; the LightningModule reads it as
`trainer.strategy.parallel_mesh`. Checkpoints are gathered into one file on rank 0 for now, which every reader
takes and which resumes on any layout.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info

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
