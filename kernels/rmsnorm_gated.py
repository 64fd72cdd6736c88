"""Gated RMSNorm (mamba_ssm's RMSNormGated) in Triton: forward and backward, float32 statistics.

norm_before_gate=False:  u = x * silu(z);  out = u * rstd(u) * weight
norm_before_gate=True:   out = x * rstd(x) * weight * silu(z)
with rstd over each group of `group_size` channels. The backward recomputes rstd from x (and z) rather than storing
it, and sums the weight gradient as per-program partials added in a fixed order (deterministic).
"""

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_fwd_kernel(x_ptr, z_ptr, w_ptr, out_ptr, M, eps,
                        sxm, szm, som,
                        GS: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * GS + tl.arange(0, BLOCK_N)
    cm = tl.arange(0, BLOCK_N) < GS
    mask = (rows < M)[:, None] & cm[None, :]
    x = tl.load(x_ptr + rows[:, None] * sxm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + rows[:, None] * szm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gate = z * tl.sigmoid(z)
        if not NORM_BEFORE_GATE:
            x = x * gate
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / GS + eps)
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    out = x * rstd[:, None] * w[None, :]
    if HAS_Z and NORM_BEFORE_GATE:
        out = out * gate
    tl.store(out_ptr + rows[:, None] * som + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd_kernel(x_ptr, z_ptr, w_ptr, dout_ptr, dx_ptr, dz_ptr, dw_part_ptr, M, D, eps, rows_per_prog,
                        sxm, szm, sgm, sdxm, sdzm,
                        GS: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * GS + tl.arange(0, BLOCK_N)
    cm = tl.arange(0, BLOCK_N) < GS
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_prog
    for r0 in range(row_start, row_start + rows_per_prog, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = ((rows < M) & (rows < row_start + rows_per_prog))[:, None] & cm[None, :]
        x = tl.load(x_ptr + rows[:, None] * sxm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(dout_ptr + rows[:, None] * sgm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + rows[:, None] * szm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            gate = z * sig
            dgate = sig * (1.0 + z * (1.0 - sig))
        u = x
        if HAS_Z and not NORM_BEFORE_GATE:
            u = x * gate
        rstd = 1.0 / tl.sqrt(tl.sum(u * u, axis=1) / GS + eps)
        n = u * rstd[:, None]
        if HAS_Z and NORM_BEFORE_GATE:
            dz = g * n * w[None, :] * dgate
            g = g * gate
        dw += tl.sum(g * n, axis=0)
        dn = g * w[None, :]
        du = (dn - n * (tl.sum(dn * n, axis=1) / GS)[:, None]) * rstd[:, None]
        if HAS_Z and not NORM_BEFORE_GATE:
            dz = du * x * dgate
            du = du * gate
        tl.store(dx_ptr + rows[:, None] * sdxm + cols[None, :], du.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_Z:
            tl.store(dz_ptr + rows[:, None] * sdzm + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + pid * D + cols, dw, mask=cm)


def _rows(t, D):
    """(..., D) -> (M, D) with unit column stride (a view when the layout allows)."""
    t2 = t.reshape(-1, D)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


@functools.lru_cache(maxsize=None)
def _num_sms(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _blocks(gs):
    BLOCK_N = triton.next_power_of_2(gs)
    BLOCK_M = max(1, min(16, 2048 // BLOCK_N))
    num_warps = min(16, max(4, BLOCK_N * BLOCK_M // 512))
    return BLOCK_M, BLOCK_N, num_warps


@torch.library.custom_op("lit_mamba2::gated_rmsnorm_fwd", mutates_args=())
def _norm_fwd(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float, group_size: int,
              norm_before_gate: bool) -> torch.Tensor:
    D = x.shape[-1]
    x2 = _rows(x, D)
    z2 = _rows(z, D) if z is not None else None
    M = x2.shape[0]
    out = torch.empty(M, D, device=x.device, dtype=x.dtype)
    BLOCK_M, BLOCK_N, nw = _blocks(group_size)
    grid = (triton.cdiv(M, BLOCK_M), D // group_size)
    _rmsnorm_fwd_kernel[grid](x2, z2 if z is not None else x2, weight, out, M, eps,
                              x2.stride(0), z2.stride(0) if z is not None else 0, out.stride(0),
                              GS=group_size, HAS_Z=z is not None, NORM_BEFORE_GATE=norm_before_gate,
                              BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=nw)
    return out.view(x.shape)


@_norm_fwd.register_fake
def _(x, z, weight, eps, group_size, norm_before_gate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("lit_mamba2::gated_rmsnorm_bwd", mutates_args=())
def _norm_bwd(dout: torch.Tensor, x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float,
              group_size: int, norm_before_gate: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    D = x.shape[-1]
    x2, g2 = _rows(x, D), _rows(dout, D)
    z2 = _rows(z, D) if z is not None else None
    M = x2.shape[0]
    dx = torch.empty(M, D, device=x.device, dtype=x.dtype)
    dz = torch.empty(M, D, device=x.device, dtype=z.dtype) if z is not None else x.new_empty(0)
    BLOCK_M, BLOCK_N, nw = _blocks(group_size)
    if x.device.type == "cuda":
        n_prog = 4 * _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
    else:
        n_prog = 4
    rows_per_prog = triton.cdiv(triton.cdiv(M, n_prog), BLOCK_M) * BLOCK_M
    n_prog = triton.cdiv(M, rows_per_prog) if M > 0 else 1
    dw_part = torch.zeros(n_prog, D, device=x.device, dtype=torch.float32)
    _rmsnorm_bwd_kernel[(n_prog, D // group_size)](
        x2, z2 if z is not None else x2, weight, g2, dx, dz if z is not None else dx, dw_part, M, D, eps, rows_per_prog,
        x2.stride(0), z2.stride(0) if z is not None else 0, g2.stride(0), dx.stride(0),
        dz.stride(0) if z is not None else 0,
        GS=group_size, HAS_Z=z is not None, NORM_BEFORE_GATE=norm_before_gate,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=nw)
    dw = dw_part.sum(0).to(weight.dtype)
    return dx.view(x.shape), (dz.view(z.shape) if z is not None else dz), dw


@_norm_bwd.register_fake
def _(dout, x, z, weight, eps, group_size, norm_before_gate):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(z, memory_format=torch.contiguous_format) if z is not None else x.new_empty(0),
            torch.empty_like(weight))


def _setup(ctx, inputs, output):
    x, z, weight, eps, group_size, norm_before_gate = inputs
    ctx.save_for_backward(x, z, weight)
    ctx.args = (eps, group_size, norm_before_gate)


def _backward(ctx, dout):
    x, z, weight = ctx.saved_tensors
    dx, dz, dw = _norm_bwd(dout, x, z, weight, *ctx.args)
    return dx, (dz if z is not None else None), dw, None, None, None


_norm_fwd.register_autograd(_backward, setup_context=_setup)


def gated_rmsnorm(x, z, weight, eps=1e-5, group_size=None, norm_before_gate=False):
    """`lit_mamba2.reference.gated_rmsnorm`'s semantics (arguments already checked by `lit_mamba2.ops`)."""
    return _norm_fwd(x, z, weight, float(eps), int(group_size or x.shape[-1]), bool(norm_before_gate))
