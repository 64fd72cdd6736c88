"""The Lightning strategy for `trainer.strategy: fsdp`: FSDP2 over the 4-D mesh of a `parallel:` layout.

Lightning's ModelParallelStrategy (FSDP2, the model parallelised from outside in `configure_model`) with our mesh
(dp_replicate × dp_shard × cp × tp) in place of its 2-D one; the LightningModule reads it as
`trainer.strategy.parallel_mesh`. Checkpoints are sharded (torch.distributed.checkpoint: every rank writes its
shards, rank 0 Lightning's meta.pt) into a folder that resumes on any layout, written aside and renamed when
complete. Under tensor parallelism each sharded parameter (and its optimizer state) is made whole and sharded over
the data-parallel mesh only for the save (mamba_ssm's names and whole shapes, which any layout resumes and every
reader takes), and cut back into this rank's pieces on load (`lit_mamba2.parallel.tensor`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

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


    def _tensor_parallel(self):
        """The model's TensorParallel plan (None without tensor parallelism), and the prefix of its names in the
        LightningModule's state dict."""
        plan = getattr(getattr(self.lightning_module, "model", None), "tensor_parallel", None)
        return plan, "model."

    def lightning_module_state_dict(self) -> dict[str, Any]:
        plan, prefix = self._tensor_parallel()
        if plan is None:
            return super().lightning_module_state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        from lit_mamba2.parallel.tensor import to_whole

        state = get_model_state_dict(self.model)
        return {k: to_whole(plan, k.removeprefix(prefix), v) for k, v in state.items()}

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        plan, prefix = self._tensor_parallel()
        if plan is None:
            return super().optimizer_state(optimizer)
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        from lit_mamba2.parallel.tensor import to_whole

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        state = get_optimizer_state_dict(self.model, optimizer)
        state["state"] = {name: {k: to_whole(plan, name.removeprefix(prefix), v) for k, v in per_param.items()}
                          for name, per_param in state["state"].items()}
        return state

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        plan, prefix = self._tensor_parallel()
        if plan is None:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        import torch
        from lightning.fabric.strategies.fsdp import _distributed_checkpoint_load
        from lightning.fabric.utilities.load import _METADATA_FILENAME
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                             set_optimizer_state_dict)

        from lit_mamba2.checkpoints import is_sharded_checkpoint
        from lit_mamba2.parallel.tensor import from_whole, whole_placeholder

        path = Path(self.broadcast(checkpoint_path))
        if not is_sharded_checkpoint(path):
            raise ValueError(f"resume: {str(path)!r} is a single-file checkpoint; under parallel.tp > 1 resume from "
                             "a sharded one (written under trainer.strategy: fsdp)")

        def name(key):
            return key.removeprefix(prefix)

        like = get_model_state_dict(self.model)
        # placeholders of the whole tensors for the checkpoint to fill, then this rank's pieces of them
        state = {"state_dict": {k: whole_placeholder(plan, name(k), v) for k, v in like.items()}}
        _distributed_checkpoint_load(state, path)
        self.model.load_state_dict({k: from_whole(plan, name(k), state["state_dict"][k], v) for k, v in like.items()},
                                   strict=self.lightning_module.strict_loading)
        for idx, optimizer in enumerate(self.optimizers):
            like = get_optimizer_state_dict(self.model, optimizer)
            whole = {p: {k: whole_placeholder(plan, name(p), v) for k, v in per_param.items()}
                     for p, per_param in like["state"].items()}
            state = {f"optimizer_{idx}": {"state": whole, "param_groups": like["param_groups"]}}
            _distributed_checkpoint_load(state, path)
            filled = state[f"optimizer_{idx}"]
            filled["state"] = {p: {k: from_whole(plan, name(p), filled["state"][p][k], v) for k, v in per_param.items()}
                               for p, per_param in like["state"].items()}
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=filled)
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)


# `L.Trainer(strategy="lit_mamba2_fsdp")` once this module is imported (`import lit_mamba2.lightning` imports it).
# Only our own name: "fsdp2" may become a name of Lightning's own, and "fsdp" is Lightning's FSDP1 strategy.
STRATEGY_NAME = "lit_mamba2_fsdp"


def _register() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    if STRATEGY_NAME not in StrategyRegistry:
        StrategyRegistry.register(STRATEGY_NAME, FSDP2Strategy,
                                  description="lit-mamba2's FSDP2 over its dp_replicate × dp_shard × cp × tp mesh")


_register()
