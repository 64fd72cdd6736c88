"""Parallelism applied to the model from outside: the layout and its mesh (dims.py), FSDP2 (fsdp.py), tensor
parallelism (tensor.py)."""

from lit_mamba2.parallel.dims import LayoutError, ParallelDims
from lit_mamba2.parallel.fsdp import apply_fsdp
from lit_mamba2.parallel.tensor import apply_tensor_parallel

__all__ = ["LayoutError", "ParallelDims", "apply_fsdp", "apply_tensor_parallel"]
