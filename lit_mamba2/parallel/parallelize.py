"""Build the model for training as the run's layout says, from outside the model (torchtitan's parallelize):
per block, its tensor-parallel split, activation checkpointing, then torch.compile, then its FSDP2 unit.

Under a mesh the model is built one part at a time: on the meta device first, then each block (and last the
embedding, final norm and LM head) is materialised on the CPU, initialised from its own seed and sharded, so that
no rank ever holds the whole model and every layout starts from the weights that `Mamba2LMHeadModel(config)` draws
from the same torch seed in one process.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from lit_mamba2.config import Mamba2Config
from lit_mamba2.model import Mamba2LMHeadModel
from lit_mamba2.parallel.fsdp import ShardingPolicy
from lit_mamba2.parallel.tensor import TensorParallel, apply_tensor_parallel


def checkpoint_block(block: nn.Module) -> nn.Module:
    """The block with its activations recomputed in backward instead of kept (torch's composable checkpoint: hooks,
    no wrapper module, so that parameter names stay as they are)."""
    from torch.distributed._composable import checkpoint

    return checkpoint(block)


def build_model(config: Mamba2Config, mesh=None, policy: Optional[ShardingPolicy] = None,
                activation_checkpointing: bool = False, compile: Union[bool, str] = False,
                tp_mesh=None) -> Mamba2LMHeadModel:
    """The model of `config` for training: whole on this process (mesh None), or sharded over the FSDP `mesh`.
    `compile`: True (inductor) or a torch.compile backend's name compiles each block. `tp_mesh` (1-D, size > 1):
    each part is split over it (lit_mamba2.parallel.tensor) before it is sharded."""
    if mesh is None:
        return parallelize(Mamba2LMHeadModel(config), None, None, activation_checkpointing, compile, tp_mesh)
    policy = policy or ShardingPolicy()
    with torch.device("meta"):
        model = Mamba2LMHeadModel(config)  # (draws model.init_seed from torch's generator, as a whole build does)
    tp = None if tp_mesh is None else TensorParallel.for_model(model, tp_mesh)
    for i, block in enumerate(model.backbone.layers):
        block.to_empty(device="cpu")  # (fully_shard moves each rank's shard to the mesh's device)
        model.init_part(i)
        if tp is not None:
            tp.split_block(block, i)
        block = model.backbone.layers[i] = _prepare(block, activation_checkpointing, compile)
        policy.shard_block(block, mesh)
    for part in (model.backbone.embedding, model.backbone.norm_f, model.lm_head):
        part.to_empty(device="cpu")
    model.init_part(config.n_layer)  # (ties the LM head to the embedding again)
    if tp is not None:
        tp.split_root(model)
    policy.shard_root(model, mesh)
    return model


def parallelize(model: Mamba2LMHeadModel, mesh=None, policy: Optional[ShardingPolicy] = None,
                activation_checkpointing: bool = False, compile: Union[bool, str] = False,
                tp_mesh=None) -> Mamba2LMHeadModel:
    """A whole model (given weights: fine-tuning) prepared for training as build_model prepares one, in place."""
    if tp_mesh is not None:
        apply_tensor_parallel(model, tp_mesh)
    for i, block in enumerate(model.backbone.layers):
        block = model.backbone.layers[i] = _prepare(block, activation_checkpointing, compile)
        if mesh is not None:
            (policy or ShardingPolicy()).shard_block(block, mesh)
    if mesh is not None:
        (policy or ShardingPolicy()).shard_root(model, mesh)
    return model


def _prepare(block: nn.Module, activation_checkpointing: bool, compile: Union[bool, str]) -> nn.Module:
    if activation_checkpointing:
        block = checkpoint_block(block)
    if compile:
        block.compile(backend="inductor" if compile is True else compile)  # in place: the names stay
    return block
