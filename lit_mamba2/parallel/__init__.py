"""Parallelism applied to the model from outside: the layout and its mesh (dims.py), FSDP2 (fsdp.py), the model
built for a layout (parallelize.py), context parallelism (context.py), tensor parallelism (tensor.py)."""

from lit_mamba2.parallel.context import apply_context_parallel, slice_batch
from lit_mamba2.parallel.dims import LayoutError, ParallelDims
from lit_mamba2.parallel.fsdp import ShardingPolicy, apply_fsdp
from lit_mamba2.parallel.parallelize import build_model, parallelize
from lit_mamba2.parallel.tensor import apply_tensor_parallel

__all__ = ["LayoutError", "ParallelDims", "ShardingPolicy", "apply_context_parallel", "apply_fsdp",
           "apply_tensor_parallel", "build_model", "parallelize", "slice_batch"]
