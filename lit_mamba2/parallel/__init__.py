"""Parallelism applied to the model from outside: the layout and its mesh (dims.py), FSDP2 (fsdp.py), context
parallelism (context.py)."""

from lit_mamba2.parallel.context import apply_context_parallel, slice_batch
from lit_mamba2.parallel.dims import LayoutError, ParallelDims
from lit_mamba2.parallel.fsdp import apply_fsdp

__all__ = ["LayoutError", "ParallelDims", "apply_context_parallel", "apply_fsdp", "slice_batch"]
