"""FSDP2 applied to the model from outside: one unit per block and one at the root (torchtitan's pattern).

Mixed precision: parameters are sharded and updated in float32; `param_dtype` (bf16) is what a unit all-gathers
and computes with, `reduce_dtype` (float32) what gradients are reduced in. The SSM's per-head scalars (A_log,
dt_bias, D) and the norm weights must not be rounded to bf16 (A = -exp(A_log) and dt = softplus(dt + dt_bias) move
by a whole bf16 ulp of the exponent, and the model computes them in float32): with `fp32_scalars`, the matrices
(in_proj, out_proj, the MLP's fc1/fc2) are units of their own in param_dtype, and the block's unit, which keeps the
remaining parameters (the scalars, the norms, the short conv's weights), gathers in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from lit_mamba2.model import Attention, GatedMLP, Mamba2LMHeadModel, Mamba2Mixer


@dataclass(frozen=True)
class ShardingPolicy:
    """How apply_fsdp shards (see the module's docstring)."""

    param_dtype: Optional[torch.dtype] = torch.bfloat16
    reduce_dtype: torch.dtype = torch.float32
    fp32_scalars: bool = True
    reshard_after_forward: bool = True

    def shard_block(self, block: nn.Module, mesh) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        low = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)
        high = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=self.reduce_dtype)
        split = self.fp32_scalars and self.param_dtype not in (None, torch.float32)
        if split:
            for matrix in _matrices(block):
                fully_shard(matrix, mesh=mesh, mp_policy=low, reshard_after_forward=self.reshard_after_forward)
        fully_shard(block, mesh=mesh, mp_policy=high if split else low,
                    reshard_after_forward=self.reshard_after_forward)

    def shard_root(self, model: Mamba2LMHeadModel, mesh) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        # the root keeps the embedding (tied to the LM head) and the final norm; after the last block it stays
        # gathered for the backward that follows at once
        fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(self.param_dtype, self.reduce_dtype),
                    reshard_after_forward=False)
        for method in ("loss", "step"):  # entry points besides forward: they gather the root's parameters too
            register_fsdp_forward_method(model, method)


def apply_fsdp(model: Mamba2LMHeadModel, mesh, param_dtype: Optional[torch.dtype] = torch.bfloat16,
               reduce_dtype: torch.dtype = torch.float32, fp32_scalars: bool = True,
               reshard_after_forward: bool = True) -> Mamba2LMHeadModel:
    """Shard `model` (float32 parameters, whole on every rank) over `mesh` in place."""
    policy = ShardingPolicy(param_dtype, reduce_dtype, fp32_scalars, reshard_after_forward)
    for block in model.backbone.layers:
        policy.shard_block(block, mesh)
    policy.shard_root(model, mesh)
    return model


def _matrices(block: nn.Module) -> list[nn.Module]:
    m = block.mixer
    # (conv1d stays in the block's unit: the mixer reads its weight without calling it, and FSDP gathers a unit
    # when its module is called; it is small, conv_dim × d_conv)
    if isinstance(m, (Mamba2Mixer, Attention)):
        out = [m.in_proj, m.out_proj]
    else:
        raise TypeError(f"unknown mixer {type(m).__name__}")
    if isinstance(block.mlp, GatedMLP):
        out += [block.mlp.fc1, block.mlp.fc2]
    return out
