"""Gated RMSNorm (mamba_ssm's RMSNormGated) in Triton: forward and backward, float32 statistics.

norm_before_gate=False:  u = x * silu(z);  out = u * rstd(u) * weight
norm_before_gate=True:   out = x * rstd(x) * weight * silu(z)
with rstd over each group of `group_size` channels.

The forward stores rstd (4 bytes per row and group) for the backward, which then needs one row reduction instead of
two. The backward is a grid of 2 programs per SM looping over rows; the weight gradient is summed from per-program
partials in a fixed order (deterministic) by one small kernel. z is usually a slice of in_proj's output whose row
stride (e.g. 3352) is not a multiple of 16, which Triton does not learn from the argument; the launcher passes the
stride's power-of-2 factor so that z's loads stay 16 bytes wide. Launch settings come from a sweep on an H100
(notes/small_kernels.md; BENCHMARKS.md, "Causal conv1d and gated RMSNorm").
"""

import functools

import torch
import triton
import triton.language as tl

from .partial_sums import sum_partials

# Launch settings, fixed (no autotuning). None: the rule in `_launch`. benchmarks/bench_small_kernels.py --sweep
# overrides them to compare variants in one run. The rule's values are the fastest of a sweep on H100 (sm_90,
# Triton 3.6, 16384 rows of 1536 / 5120, GPU ms of each kernel alone): backward loading rstd 0.117 / 0.420 vs
# recomputing it 0.141 / 0.452; 2 programs per SM 0.117 / 0.420, 4: 0.119 / 0.422, 1: 0.167 / 0.420; a pipelined
# row loop (2 stages) 0.124 / 0.387; the dw partials summed by one Triton kernel 0.117 / 0.420 vs torch's sum + cast
# 0.123 / 0.428; z's stride hint at 1536: forward 0.0519 vs 0.0526. A group's columns as two power-of-2 blocks
# (1024 + 512, 4096 + 1024) instead of one padded block (2048, 8192): forward 0.0524 vs 0.0518 / 0.1697 vs 0.1689
# (no gain), backward 0.179 vs 0.117 / 0.497 vs 0.420 (lost). The three that lost (the split, recomputing rstd,
# torch's sum) are not in the code.
CONFIG = dict(
    fwd_rows=None, fwd_warps=None,  # rows per forward program, its warps
    bwd_rows=None, bwd_warps=None,  # rows per step of a backward program's loop, its warps
    bwd_progs_per_sm=None,  # backward programs per SM (each loops over M / programs rows)
    bwd_stages=None,  # software-pipelining depth of the backward's row loop
    z_align=True,  # tell Triton z's row stride's power-of-2 factor (False: it assumes 1 unless the stride % 16 == 0)
)


@triton.jit
def _row_offset(rows, stride, ALIGN: tl.constexpr):
    off = rows.to(tl.int64) * stride
    if ALIGN > 1:
        off = tl.multiple_of(off, ALIGN)
    return off


@triton.jit
def _load_gated(x_ptr, z_ptr, xo, zo, cols, mask, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr):
    """x, the input to normalise u, silu(z) and silu'(z) of a tile of rows and a group's columns (x itself where there
    is no z)."""
    x = tl.load(x_ptr + xo[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = x
    gate = x
    dgate = x
    if HAS_Z:
        z = tl.load(z_ptr + zo[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(z)
        gate = z * sig
        dgate = sig * (1.0 + z * (1.0 - sig))
        if not NORM_BEFORE_GATE:
            u = x * gate
    return x, u, gate, dgate


@triton.jit
def _store_out(out_ptr, oo, w_ptr, cols, wmask, mask, u, gate, rstd,
               HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr):
    w = tl.load(w_ptr + cols, mask=wmask, other=0.0).to(tl.float32)
    out = u * rstd[:, None] * w[None, :]
    if HAS_Z and NORM_BEFORE_GATE:
        out = out * gate
    tl.store(out_ptr + oo[:, None] + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _rmsnorm_fwd_kernel(x_ptr, z_ptr, w_ptr, out_ptr, rstd_ptr, M, eps,
                        sxm, szm, som,
                        GS: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Z_ALIGN: tl.constexpr):
    # the group's columns, GS padded to the power of 2 BLOCK_N
    grp = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    xo = _row_offset(rows, sxm, 1)
    zo = _row_offset(rows, szm, Z_ALIGN)
    oo = _row_offset(rows, som, 1)
    cols = grp * GS + tl.arange(0, BLOCK_N)
    cmask = tl.arange(0, BLOCK_N) < GS
    mask = rmask[:, None] & cmask[None, :]
    _, u, gate, _ = _load_gated(x_ptr, z_ptr, xo, zo, cols, mask, HAS_Z, NORM_BEFORE_GATE)
    ss = tl.sum(u * u, axis=1)
    rstd = 1.0 / tl.sqrt(ss / GS + eps)
    tl.store(rstd_ptr + grp * M + rows, rstd, mask=rmask)
    _store_out(out_ptr, oo, w_ptr, cols, cmask, mask, u, gate, rstd, HAS_Z, NORM_BEFORE_GATE)


@triton.jit
def _bwd_dn(u, rstd, dy, w, gate, dgate, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr):
    """Before the row sum: n = u * rstd, the gradient reaching n (dn), the gradient reaching
    weight (dy * n, to be summed over rows) and, for norm_before_gate, dz."""
    n = u * rstd[:, None]
    dz = n
    if HAS_Z and NORM_BEFORE_GATE:
        dz = dy * n * w[None, :] * dgate
        dy = dy * gate
    return n, dy * w[None, :], dy * n, dz


@triton.jit
def _bwd_store(dx_ptr, dz_ptr, dxo, dzo, cols, mask, x, n, dn, c, rstd, gate, dgate, dz,
               HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr):
    du = (dn - n * c[:, None]) * rstd[:, None]
    if HAS_Z and not NORM_BEFORE_GATE:
        dz = du * x * dgate
        du = du * gate
    tl.store(dx_ptr + dxo[:, None] + cols[None, :], du.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_Z:
        tl.store(dz_ptr + dzo[:, None] + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)


# eps is unused here (rstd comes from the forward); it stays in the signature because removing it reorders the
# compiled backward (offline sm_90 SASS, Triton 3.6), which was timed with it
@triton.jit(do_not_specialize=["M", "rows_per_prog"])
def _rmsnorm_bwd_kernel(x_ptr, z_ptr, w_ptr, dout_ptr, rstd_ptr, dx_ptr, dz_ptr, dw_part_ptr, M, D, eps,
                        rows_per_prog, sxm, szm, sgm, sdxm, sdzm,
                        GS: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Z_ALIGN: tl.constexpr,
                        NUM_STAGES: tl.constexpr):
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    cols = grp * GS + tl.arange(0, BLOCK_N)
    cmask = tl.arange(0, BLOCK_N) < GS
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r0 in tl.range(row_start, row_end, BLOCK_M, num_stages=NUM_STAGES):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        xo = _row_offset(rows, sxm, 1)
        zo = _row_offset(rows, szm, Z_ALIGN)
        go = _row_offset(rows, sgm, 1)
        mask = rmask[:, None] & cmask[None, :]
        x, u, gate, dgate = _load_gated(x_ptr, z_ptr, xo, zo, cols, mask, HAS_Z, NORM_BEFORE_GATE)
        dy = tl.load(dout_ptr + go[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + grp * M + rows, mask=rmask, other=0.0)
        n, dn, dwr, dz = _bwd_dn(u, rstd, dy, w, gate, dgate, HAS_Z, NORM_BEFORE_GATE)
        dw += tl.sum(dwr, axis=0)
        s = tl.sum(dn * n, axis=1)
        c = s / GS
        dxo = _row_offset(rows, sdxm, 1)
        dzo = _row_offset(rows, sdzm, 1)
        _bwd_store(dx_ptr, dz_ptr, dxo, dzo, cols, mask, x, n, dn, c, rstd, gate, dgate, dz,
                   HAS_Z, NORM_BEFORE_GATE)
    tl.store(dw_part_ptr + pid * D + cols, dw, mask=cmask)


def _rows(t, D):
    """(..., D) -> (M, D) with unit column stride (a view when the layout allows)."""
    t2 = t.reshape(-1, D)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


@functools.lru_cache(maxsize=None)
def _num_sms(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch(gs):
    """(fwd rows, fwd warps, bwd rows, bwd warps, bwd programs per SM, bwd stages) for one group size; CONFIG entries
    that are not None override the rule. Groups of >= 2048 lanes: sweep run 1's winners at 1536 and 5120 (one row per
    program or loop step, 8 warps; 2 stages measured only at 8192 lanes). Smaller groups (several groups per row)
    were not swept: several rows per program, about 2048 lanes in all."""
    lanes = triton.next_power_of_2(gs)
    if lanes >= 2048:
        rows, warps = 1, 8
    else:
        rows = min(16, 2048 // lanes)
        warps = max(4, lanes * rows // 512)
    stages = 2 if lanes > 2048 else 1
    c = CONFIG
    return (c["fwd_rows"] or rows, c["fwd_warps"] or warps, c["bwd_rows"] or rows, c["bwd_warps"] or warps,
            c["bwd_progs_per_sm"] or 2, c["bwd_stages"] or stages)


def _z_align(t):
    """The power-of-2 factor (up to 16) of a row stride, as a Triton divisibility hint."""
    if not CONFIG["z_align"]:
        return 1
    s = t.stride(0)
    return min(16, s & -s) if s > 0 else 1


@torch.library.custom_op("lit_mamba2::gated_rmsnorm_fwd", mutates_args=())
def _norm_fwd(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float, group_size: int,
              norm_before_gate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    D = x.shape[-1]
    x2 = _rows(x, D)
    z2 = _rows(z, D) if z is not None else None
    M = x2.shape[0]
    out = torch.empty(M, D, device=x.device, dtype=x.dtype)
    rstd = torch.empty(D // group_size, M, device=x.device, dtype=torch.float32)
    rows, nw, *_ = _launch(group_size)
    grid = (triton.cdiv(M, rows), D // group_size)
    if M > 0:
        _rmsnorm_fwd_kernel[grid](x2, z2 if z is not None else x2, weight, out, rstd, M, eps,
                                  x2.stride(0), z2.stride(0) if z is not None else 0, out.stride(0),
                                  GS=group_size, HAS_Z=z is not None, NORM_BEFORE_GATE=norm_before_gate,
                                  BLOCK_M=rows, BLOCK_N=triton.next_power_of_2(group_size),
                                  Z_ALIGN=_z_align(z2) if z is not None else 1, num_warps=nw)
    return out.view(x.shape), rstd


@_norm_fwd.register_fake
def _(x, z, weight, eps, group_size, norm_before_gate):
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[-1] // group_size, M, dtype=torch.float32))


@torch.library.custom_op("lit_mamba2::gated_rmsnorm_bwd", mutates_args=())
def _norm_bwd(dout: torch.Tensor, x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor,
              rstd: torch.Tensor, eps: float, group_size: int,
              norm_before_gate: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    D = x.shape[-1]
    x2, g2 = _rows(x, D), _rows(dout, D)
    z2 = _rows(z, D) if z is not None else None
    M = x2.shape[0]
    dx = torch.empty(M, D, device=x.device, dtype=x.dtype)
    dz = torch.empty(M, D, device=x.device, dtype=z.dtype) if z is not None else x.new_empty(0)
    _, _, rows, nw, per_sm, stages = _launch(group_size)
    if x.device.type == "cuda":
        n_prog = per_sm * _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
    else:
        n_prog = per_sm
    rows_per_prog = triton.cdiv(triton.cdiv(max(M, 1), n_prog), rows) * rows
    n_prog = triton.cdiv(max(M, 1), rows_per_prog)
    # every program stores its partial (zeros when it has no rows), so no memset
    dw_part = torch.empty(n_prog, D, device=x.device, dtype=torch.float32)
    _rmsnorm_bwd_kernel[(n_prog, D // group_size)](
        x2, z2 if z is not None else x2, weight, g2, rstd, dx, dz if z is not None else dx, dw_part, M, D, eps,
        rows_per_prog, x2.stride(0), z2.stride(0) if z is not None else 0, g2.stride(0), dx.stride(0),
        dz.stride(0) if z is not None else 0,
        GS=group_size, HAS_Z=z is not None, NORM_BEFORE_GATE=norm_before_gate,
        BLOCK_M=rows, BLOCK_N=triton.next_power_of_2(group_size), Z_ALIGN=_z_align(z2) if z is not None else 1,
        NUM_STAGES=stages, num_warps=nw)
    dw = sum_partials(dw_part, weight.dtype)
    return dx.view(x.shape), (dz.view(z.shape) if z is not None else dz), dw


@_norm_bwd.register_fake
def _(dout, x, z, weight, rstd, eps, group_size, norm_before_gate):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(z, memory_format=torch.contiguous_format) if z is not None else x.new_empty(0),
            torch.empty_like(weight))


def _setup(ctx, inputs, output):
    x, z, weight, eps, group_size, norm_before_gate = inputs
    rstd = output[1]
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)  # no zeros for rstd's (absent) gradient
    ctx.save_for_backward(x, z, weight, rstd)
    ctx.args = (eps, group_size, norm_before_gate)


def _backward(ctx, dout, _drstd):
    x, z, weight, rstd = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None, None
    dx, dz, dw = _norm_bwd(dout, x, z, weight, rstd, *ctx.args)
    return dx, (dz if z is not None else None), dw, None, None, None


_norm_fwd.register_autograd(_backward, setup_context=_setup)


def gated_rmsnorm(x, z, weight, eps=1e-5, group_size=None, norm_before_gate=False):
    """`lit_mamba2.reference.gated_rmsnorm`'s semantics (arguments already checked by `lit_mamba2.ops`)."""
    return _norm_fwd(x, z, weight, float(eps), int(group_size or x.shape[-1]), bool(norm_before_gate))[0]
