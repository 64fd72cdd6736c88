"""Per-program partial sums of a gradient, added up in a fixed order and cast, in one launch.

The backward kernels of the gated norm, the conv and the SSD leave a parameter's gradient as float32 partials, one
row per program (deterministic: no atomics). `sum_partials` adds the rows in a fixed order and casts the result to
the parameter's dtype in a single small kernel, where `part.sum(0).to(dtype)` takes two launches (a third for each
extra dimension reduced).
"""

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["P", "D"])
def _sum_rows_kernel(part_ptr, out_ptr, P, D, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[d] = sum over p of part[p, d], in a fixed order, cast to out's dtype."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cols < D
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    # all partial rows in one or two loads per program: a loop of small dependent loads would be latency-bound
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(part_ptr + p[:, None] * D + cols[None, :], mask=(p < P)[:, None] & cm[None, :], other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=cm)


def sum_partials(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """part: (..., D) float32 partials, contiguous; returns the sum over every leading dimension, (D,), in dtype."""
    if part.dtype != torch.float32 or not part.is_contiguous():
        raise ValueError(f"sum_partials takes contiguous float32 partials, got {part.dtype} strides {part.stride()}")
    D = part.shape[-1]
    P = part.numel() // D if D else 0
    out = torch.empty(D, device=part.device, dtype=dtype)
    if D:
        _sum_rows_kernel[(triton.cdiv(D, 32),)](part, out, P, D, BLOCK_P=min(256, triton.next_power_of_2(max(P, 1))),
                                                BLOCK_D=32, num_warps=4)
    return out
