"""Linear layers for decoding at small batch, each with the norm before it fused into its prologue.

At batch 1 a decode step is bound by kernel launches (a few µs each, even in a CUDA graph), not by bytes: the
weights of mamba2-130m stream in ~0.1 ms. So a Mamba-2 layer's step is three launches here instead of five:

    [residual add + RMSNorm + in_proj]   [conv + SSM state update (state_update.py)]
    [gated RMSNorm + out_proj + residual add]

and the final norm rides in the LM head's prologue. Each program computes BLOCK_N outputs (a GEMV tile) and
recomputes the norm statistics itself (a d_model- or d_inner-long read that stays in L1/L2) instead of waiting for
another launch to produce them. Below GEMV_BELOW rows the default is _norm_gemv_kernel: a program holds whole
weight rows, all loaded before the PDL wait, so that a layer's weights stream in while the kernel before it still
runs (kernels/pdl.py) and only activations are read after it. Measured and dropped (decode run 6, dec1b): the conv
+ state update inside out_proj's launch (two launches per layer, out_proj's tiles waiting on a release/acquire
count of the state tiles, tiles taken by ticket so that no tile waits on one not yet scheduled): 0.218 / 0.554 ms
per step at batch 1 (130m / 370m) against 0.201 / 0.485 with three launches and PDL; the count's round trips cost
more than the launch they saved. From GEMV_BELOW rows on, a block of up to 64 rows shares each weight
tile through tl.dot instead, so the weight is read once per 64 rows (batch 64: once); measured slower than
cuBLAS there so far, it is not the default (see GEMV_BELOW).

Rounding follows the unfused path: the residual sum is kept in the residual's dtype; RMSNorm's input is that sum
rounded to the norm weight's dtype, and the normalised vector is rounded to the linear weight's dtype before the
product (as the unfused path stores it); the output is rounded to the weight's dtype before it is added to the
residual.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .pdl import options as pdl_options, release_early, wait_and_release

# Below GEMV_BELOW rows: one row per program (_norm_linear_kernel, CONFIG = (BLOCK_N, BLOCK_K, num_warps,
# single_pass)); from it on: blocks of rows through tl.dot (_norm_matmul_kernel, DOT_CONFIG = (BLOCK_M, BLOCK_N,
# BLOCK_K, num_warps, num_stages, single_pass)). single_pass: the norm's rstd multiplied in after the product, so
# the input row is read once instead of twice (not yet measured on the GPU, so off). H100 (sm_90): the tiles are
# the fastest of benchmarks/bench_decode.py --sweep at batch 1: 4.1 µs for mamba2-130m's [add + norm + in_proj]
# (cuBLAS alone 3.4, unfused 5.1) and 4.2 µs for [gated norm + out_proj + residual add] (unfused 9.3). The tl.dot
# kernel is 4-7x slower than cuBLAS at batch 64 as it stands (too few programs, a serial two-pass prologue), so
# generation.Decoder uses it only when asked (fuse_linear=True at batch >= GEMV_BELOW).
GEMV_BELOW = 8
# the interpreter multiplies bfloat16 as raw bits (numpy has no bfloat16): it gets float32 dot operands (the same
# products: the operands are rounded to the weight's dtype first)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CONFIG = (4, 512, 4, False)
CONFIG_WIDE = (4, 512, 4, False)  # from WIDE_N outputs on (the LM head)
WIDE_N = 16384
DOT_CONFIG = (64, 32, 128, 4, 3, False)
# Below GEMV_BELOW rows, where the padded row (next_power_of_2(K)) has at most ROW_MAX_K channels and the norm at
# most ROW_MAX_GROUPS groups: _norm_gemv_kernel instead, whole weight rows per program, all loaded before the PDL
# wait. ROW_TILE = (weight elements per program, num_warps); ROW_TILE_WIDE from WIDE_N outputs on (the LM head).
# H100 (sm_90), batch 1, whole captured steps: whole rows because a layer's weights then stream in while the kernel
# before runs: 0.230 / 0.541 ms for mamba2-130m / -370m against 0.320 / 0.740 with the chunked kernel above; 4096
# elements per program because 2048 were slower (0.266 / 0.645) and 8192 lose with early PDL release (0.246 /
# 0.483 against 0.206 / 0.482); the LM head's tile does not matter (4096 to 16384: within 1 %).
FULL_ROW = True
ROW_TILE = (4096, 4)
ROW_TILE_WIDE = (8192, 8)
ROW_MAX_K = 8192
ROW_MAX_GROUPS = 8
# The GEMV loads its first weight chunk before waiting for the previous kernel: None = when launched with PDL
# (kernels/pdl.py), where the load overlaps the previous kernel's end; True / False force it (tests, sweeps)
PRELOAD_WEIGHTS = None


@triton.jit
def _norm_input(x_ptr, r_ptr, z_ptr, r_out_ptr, nw_ptr, ox, orr, oz, oro, mask, store,
                ADD_RESIDUAL: tl.constexpr, WRITE_RESIDUAL: tl.constexpr, HAS_Z: tl.constexpr,
                NORM_BEFORE_GATE: tl.constexpr):
    """One chunk of the norm's input in float32 (x, + residual, rounded as the unfused path rounds it; the new
    residual stored where `store`; gated already unless NORM_BEFORE_GATE), and the gate silu(z) (ones without z).
    ox...oro: the chunk's offsets."""
    u = tl.load(x_ptr + ox, mask=mask, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:
        u += tl.load(r_ptr + orr, mask=mask, other=0.0).to(tl.float32)
    if WRITE_RESIDUAL:
        u = u.to(r_out_ptr.dtype.element_ty)
        if store:
            tl.store(r_out_ptr + oro, u, mask=mask)
    if HAS_Z:
        zv = tl.load(z_ptr + oz, mask=mask, other=0.0).to(tl.float32)
        gate = zv * tl.sigmoid(zv)
        u = u.to(tl.float32)
        if not NORM_BEFORE_GATE:
            u = u * gate
    else:
        gate = tl.zeros_like(u) + 1.0
        u = u.to(nw_ptr.dtype.element_ty).to(tl.float32)  # RMSNorm reads the residual in its weight's dtype
    return u, gate


@triton.jit
def _group_chunk(x_ptr, r_ptr, z_ptr, r_out_ptr, nw_ptr, rows, row_mask, x_b, r_b, z_b, ro_b, g, k0, group_size,
                 store, ADD_RESIDUAL: tl.constexpr, WRITE_RESIDUAL: tl.constexpr, HAS_Z: tl.constexpr,
                 NORM_BEFORE_GATE: tl.constexpr, BLOCK_K: tl.constexpr):
    """Chunk k0 of norm group g for input rows `rows`: one batch row (row_mask True), or a (BLOCK_M, 1) block of
    rows with their mask, the chunk's channels broadcast against it. Returns the chunk's channels, their mask, and
    _norm_input's (u, gate)."""
    kk = k0 + tl.arange(0, BLOCK_K)
    mk = kk < group_size
    mask = row_mask & mk  # (before offs_k: the order the row kernel had, and its PTX, is kept)
    offs_k = g * group_size + kk
    u, gate = _norm_input(x_ptr, r_ptr, z_ptr, r_out_ptr, nw_ptr, rows * x_b + offs_k, rows * r_b + offs_k,
                          rows * z_b + offs_k, rows * ro_b + offs_k, mask, store, ADD_RESIDUAL, WRITE_RESIDUAL,
                          HAS_Z, NORM_BEFORE_GATE)
    return offs_k, mk, u, gate


@triton.jit
def _weighted(u, gate, nw_ptr, offs_k, mk, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr):
    """u (already scaled by rstd in the two-pass form) times the norm weight of channels offs_k, and gated when
    the gate comes after the norm: the vector the linear weight multiplies, in float32."""
    v = u * tl.load(nw_ptr + offs_k, mask=mk, other=0.0).to(tl.float32)
    if HAS_Z and NORM_BEFORE_GATE:
        v = v * gate
    return v


@triton.jit
def _weight_chunk(w_ptr, offs_n, offs_k, w_n, mask_n, mk, g, k0, w_first, PRELOAD: tl.constexpr):
    """The (BLOCK_N, BLOCK_K) weight tile at group g, chunk k0 (the preloaded one for the first chunk)."""
    if PRELOAD:
        if (g == 0) & (k0 == 0):
            w = w_first
        else:
            w = tl.load(w_ptr + offs_n[:, None] * w_n + offs_k[None, :], mask=mask_n[:, None] & mk[None, :],
                        other=0.0)
    else:
        w = tl.load(w_ptr + offs_n[:, None] * w_n + offs_k[None, :], mask=mask_n[:, None] & mk[None, :], other=0.0)
    return w


@triton.jit
def _norm_linear_kernel(
    x_ptr, r_ptr, z_ptr, nw_ptr, w_ptr, bias_ptr, r_out_ptr, out_ptr, acc_ptr,
    N, K, ngroups, group_size, eps,
    x_b, r_b, z_b, ro_b, w_n, o_b, a_b,
    ADD_RESIDUAL: tl.constexpr, WRITE_RESIDUAL: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, SINGLE_PASS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRELOAD: tl.constexpr, USE_PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if PRELOAD:  # the first weight chunk, loaded before the wait: with PDL it streams while the kernel before ends
        k_first = tl.arange(0, BLOCK_K)
        w_first = tl.load(w_ptr + offs_n[:, None] * w_n + k_first[None, :],
                          mask=mask_n[:, None] & (k_first < group_size)[None, :], other=0.0)
    else:  # unused (the compiler drops it)
        w_first = tl.zeros([BLOCK_N, BLOCK_K], dtype=w_ptr.dtype.element_ty)
    wait_and_release(USE_PDL)  # every input but the weights comes from the kernels before (pdl.py)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for g in range(0, ngroups):
        # pass 1: the group's sum of squares (program 0 of the row also stores the new residual). SINGLE_PASS:
        # also the product with the unnormalised input, scaled by the group's rstd at the end (the row is read
        # once; the normalised input is then not rounded to the weight's dtype before the product)
        ss = tl.zeros([BLOCK_K], dtype=tl.float32)
        acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, group_size, BLOCK_K):
            offs_k, mk, u, gate = _group_chunk(x_ptr, r_ptr, z_ptr, r_out_ptr, nw_ptr, b, True, x_b, r_b, z_b, ro_b, g,
                                               k0, group_size, pid_n == 0, ADD_RESIDUAL, WRITE_RESIDUAL, HAS_Z,
                                               NORM_BEFORE_GATE, BLOCK_K)
            ss += u * u
            if SINGLE_PASS:
                v = _weighted(u, gate, nw_ptr, offs_k, mk, HAS_Z, NORM_BEFORE_GATE)
                w = _weight_chunk(w_ptr, offs_n, offs_k, w_n, mask_n, mk, g, k0, w_first, PRELOAD)
                acc_g += w.to(tl.float32) * v[None, :]
        rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / group_size + eps)
        if SINGLE_PASS:
            acc += acc_g * rstd
        else:
            # pass 2: normalise again chunk by chunk (the row is in cache) and multiply into the weight tile
            for k0 in range(0, group_size, BLOCK_K):
                offs_k, mk, u, gate = _group_chunk(x_ptr, r_ptr, z_ptr, r_out_ptr, nw_ptr, b, True, x_b, r_b, z_b, ro_b,
                                                   g, k0, group_size, False, ADD_RESIDUAL, WRITE_RESIDUAL, HAS_Z,
                                                   NORM_BEFORE_GATE, BLOCK_K)
                nrm = _weighted(u * rstd, gate, nw_ptr, offs_k, mk, HAS_Z, NORM_BEFORE_GATE)
                nrm = nrm.to(w_ptr.dtype.element_ty).to(tl.float32)
                w = _weight_chunk(w_ptr, offs_n, offs_k, w_n, mask_n, mk, g, k0, w_first, PRELOAD)
                acc += w.to(tl.float32) * nrm[None, :]
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    out = out.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * o_b + offs_n, out, mask=mask_n)
    if ACCUMULATE:  # each program owns its outputs' residual entries: the in-place add has no race
        a = tl.load(acc_ptr + b * a_b + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(acc_ptr + b * a_b + offs_n, (a + out.to(tl.float32)).to(acc_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _norm_gemv_kernel(
    x_ptr, r_ptr, z_ptr, nw_ptr, w_ptr, bias_ptr, r_out_ptr, out_ptr, acc_ptr,
    M, N, K, group_size, eps,
    x_b, r_b, z_b, ro_b, w_n, o_b, a_b,
    ADD_RESIDUAL: tl.constexpr, WRITE_RESIDUAL: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, NGROUPS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
):
    """_norm_linear_kernel with whole rows: a program holds BLOCK_N full weight rows (BLOCK_K >= K), loaded with
    the norm weight and bias before the PDL wait, so that with PDL a layer's weights stream while the kernel before
    still runs and only the activations are read after it (one round trip to L2). The program then does the batch's
    M rows with the weights in registers. The norm over NGROUPS groups of channels is computed from the row in
    registers; same roundings as _norm_linear_kernel's two-pass form.
    Measured (decode runs 6 and 7, H100): this form (rows looped, M = 1 specialised to a constant at batch 1) takes
    0.200 / 0.488 ms per step at batch 1 (130m / 370m); one row per program on grid axis 1 took 0.205 / 0.502 and,
    with the row offsets taken from program_id(1) inside the kernel, 0.267 / 0.507; at batch 4 all three tie with
    cuBLAS (0.51 / 1.11-1.18)."""
    release_early(USE_PDL)
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    mk = offs_k < K
    w = tl.load(w_ptr + offs_n[:, None] * w_n + offs_k[None, :], mask=mask_n[:, None] & mk[None, :], other=0.0)
    nw = tl.load(nw_ptr + offs_k, mask=mk, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    group = offs_k // group_size
    wait_and_release(USE_PDL)  # every input but the parameters comes from the kernels before (pdl.py)
    for b in range(0, M):
        u, gate = _norm_input(x_ptr, r_ptr, z_ptr, r_out_ptr, nw_ptr, b * x_b + offs_k, b * r_b + offs_k,
                              b * z_b + offs_k, b * ro_b + offs_k, mk, pid_n == 0, ADD_RESIDUAL, WRITE_RESIDUAL,
                              HAS_Z, NORM_BEFORE_GATE)
        if ACCUMULATE:
            a = tl.load(acc_ptr + b * a_b + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        sq = u * u
        if NGROUPS == 1:
            rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / group_size + eps)
        else:  # each group's statistics by masked sums (NGROUPS is small)
            rstd = tl.zeros_like(u)
            for g in tl.static_range(NGROUPS):
                in_g = group == g
                rstd = tl.where(in_g, 1.0 / tl.sqrt(tl.sum(tl.where(in_g, sq, 0.0), axis=0) / group_size + eps),
                                rstd)
        nrm = u * rstd * nw
        if HAS_Z and NORM_BEFORE_GATE:
            nrm = nrm * gate
        nrm = nrm.to(w_ptr.dtype.element_ty).to(tl.float32)
        out = tl.sum(w.to(tl.float32) * nrm[None, :], axis=1)
        if HAS_BIAS:
            out += bias
        out = out.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + b * o_b + offs_n, out, mask=mask_n)
        if ACCUMULATE:  # each program owns its outputs' residual entries: the in-place add has no race
            tl.store(acc_ptr + b * a_b + offs_n, (a + out.to(tl.float32)).to(acc_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _norm_matmul_kernel(
    x_ptr, r_ptr, z_ptr, nw_ptr, w_ptr, bias_ptr, r_out_ptr, out_ptr, acc_ptr,
    M, N, K, ngroups, group_size, eps,
    x_b, r_b, z_b, ro_b, w_n, o_b, a_b,
    ADD_RESIDUAL: tl.constexpr, WRITE_RESIDUAL: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, SINGLE_PASS: tl.constexpr, IEEE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """_norm_linear_kernel for a block of BLOCK_M rows at once (tl.dot): the weight tile is read once per block of
    rows instead of once per row. Same prologue and epilogue, same roundings."""
    pid_n = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    wait_and_release(USE_PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(0, ngroups):
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, group_size, BLOCK_K):
            offs_k, mkk, u, gate = _group_chunk(x_ptr, r_ptr, z_ptr, r_out_ptr, nw_ptr, offs_m[:, None],
                                                mask_m[:, None], x_b, r_b, z_b, ro_b, g, k0, group_size, pid_n == 0,
                                                ADD_RESIDUAL, WRITE_RESIDUAL, HAS_Z, NORM_BEFORE_GATE, BLOCK_K)
            ss += tl.sum(u * u, axis=1)
            if SINGLE_PASS:
                v = _weighted(u, gate, nw_ptr, offs_k, mkk, HAS_Z, NORM_BEFORE_GATE)
                w = tl.load(w_ptr + offs_n[None, :] * w_n + offs_k[:, None], mask=mask_n[None, :] & mkk[:, None],
                            other=0.0)  # (BLOCK_K, BLOCK_N): the weight transposed
                v = v.to(w_ptr.dtype.element_ty).to(DOT_DTYPE)
                if IEEE:
                    acc_g += tl.dot(v, w.to(DOT_DTYPE), input_precision="ieee")
                else:
                    acc_g += tl.dot(v, w.to(DOT_DTYPE))
        rstd = 1.0 / tl.sqrt(ss / group_size + eps)
        if SINGLE_PASS:
            acc += acc_g * rstd[:, None]
        else:
            for k0 in range(0, group_size, BLOCK_K):
                offs_k, mkk, u, gate = _group_chunk(x_ptr, r_ptr, z_ptr, r_out_ptr, nw_ptr, offs_m[:, None],
                                                    mask_m[:, None], x_b, r_b, z_b, ro_b, g, k0, group_size, False,
                                                    ADD_RESIDUAL, WRITE_RESIDUAL, HAS_Z, NORM_BEFORE_GATE, BLOCK_K)
                nrm = _weighted(u * rstd[:, None], gate, nw_ptr, offs_k, mkk, HAS_Z, NORM_BEFORE_GATE)
                w = tl.load(w_ptr + offs_n[None, :] * w_n + offs_k[:, None], mask=mask_n[None, :] & mkk[:, None],
                            other=0.0)
                nrm = nrm.to(w_ptr.dtype.element_ty).to(DOT_DTYPE)
                if IEEE:
                    acc += tl.dot(nrm, w.to(DOT_DTYPE), input_precision="ieee")
                else:
                    acc += tl.dot(nrm, w.to(DOT_DTYPE))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = acc.to(out_ptr.dtype.element_ty)
    mo = mask_m[:, None] & mask_n[None, :]
    tl.store(out_ptr + offs_m[:, None] * o_b + offs_n[None, :], out, mask=mo)
    if ACCUMULATE:
        a_ptrs = acc_ptr + offs_m[:, None] * a_b + offs_n[None, :]
        a = tl.load(a_ptrs, mask=mo, other=0.0).to(tl.float32)
        tl.store(a_ptrs, (a + out.to(tl.float32)).to(acc_ptr.dtype.element_ty), mask=mo)


def _full_rows(config, K, ngroups) -> bool:
    """Whether _norm_gemv_kernel (whole rows) runs: a 2-tuple config asks for it, a 4-tuple for the chunked
    kernel; by default FULL_ROW where the padded row and the groups fit."""
    if config is not None:
        return len(config) == 2
    return FULL_ROW and triton.next_power_of_2(K) <= ROW_MAX_K and ngroups <= ROW_MAX_GROUPS


def _rows(name, t, b, k):
    if t.dim() != 2 or t.shape != (b, k) or t.stride(1) != 1:
        raise ValueError(f"{name}: expected a ({b}, {k}) tensor with contiguous rows, got {tuple(t.shape)} "
                         f"strides {t.stride()}")


def _launch(x, weight, norm_weight, eps, *, residual=None, r_out=None, z=None, ngroups=1, norm_before_gate=False,
            bias=None, accumulate=None, config=None):
    b, K = x.shape
    N = weight.shape[0]
    if weight.shape != (N, K) or weight.stride(1) != 1:
        raise ValueError(f"norm_linear: weight must be ({N}, {K}) with contiguous rows, got {tuple(weight.shape)}")
    if K % ngroups:
        raise ValueError(f"norm_linear: {K} channels do not split into {ngroups} groups")
    for name, t in (("x", x), ("residual", residual), ("residual out", r_out), ("z", z)):
        if t is not None:
            _rows(name, t, b, K)
    if accumulate is not None:
        _rows("accumulate", accumulate, b, N)
    out = torch.empty(b, N, device=x.device, dtype=weight.dtype)
    group_size = K // ngroups
    dummy = x
    args = (x, residual if residual is not None else dummy, z if z is not None else dummy, norm_weight, weight,
            bias if bias is not None else norm_weight, r_out if r_out is not None else dummy, out,
            accumulate if accumulate is not None else out)
    strides = (x.stride(0), residual.stride(0) if residual is not None else 0, z.stride(0) if z is not None else 0,
               r_out.stride(0) if r_out is not None else 0, weight.stride(0), out.stride(0),
               accumulate.stride(0) if accumulate is not None else 0)
    flags = dict(ADD_RESIDUAL=residual is not None, WRITE_RESIDUAL=r_out is not None, HAS_Z=z is not None,
                 NORM_BEFORE_GATE=norm_before_gate, HAS_BIAS=bias is not None, ACCUMULATE=accumulate is not None)
    if b < GEMV_BELOW and _full_rows(config, K, ngroups):
        elements, num_warps = config or (ROW_TILE_WIDE if N >= WIDE_N else ROW_TILE)
        BLOCK_K = triton.next_power_of_2(K)
        BLOCK_N = max(1, min(triton.next_power_of_2(N), elements // BLOCK_K))
        _norm_gemv_kernel[(triton.cdiv(N, BLOCK_N),)](
            *args, b, N, K, group_size, float(eps), *strides, **flags, NGROUPS=ngroups, BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K, num_warps=num_warps, **pdl_options(early=True))
    elif b < GEMV_BELOW:
        BLOCK_N, BLOCK_K, num_warps, single_pass = config or (CONFIG_WIDE if N >= WIDE_N else CONFIG)
        BLOCK_K = min(BLOCK_K, triton.next_power_of_2(group_size))
        pdl = pdl_options()
        preload = bool(pdl["USE_PDL"]) if PRELOAD_WEIGHTS is None else PRELOAD_WEIGHTS
        _norm_linear_kernel[(triton.cdiv(N, BLOCK_N), b)](
            *args, N, K, ngroups, group_size, float(eps), *strides, **flags, SINGLE_PASS=single_pass,
            BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PRELOAD=preload, num_warps=num_warps, **pdl)
    else:
        BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, single_pass = config or DOT_CONFIG
        BLOCK_M = min(BLOCK_M, max(16, triton.next_power_of_2(b)))
        BLOCK_K = max(16, min(BLOCK_K, triton.next_power_of_2(group_size)))
        _norm_matmul_kernel[(triton.cdiv(N, BLOCK_N), triton.cdiv(b, BLOCK_M))](
            *args, b, N, K, ngroups, group_size, float(eps), *strides, **flags, SINGLE_PASS=single_pass,
            IEEE=weight.dtype == torch.float32,
            DOT_DTYPE=tl.float32 if _INTERPRET or weight.dtype == torch.float32 else tl.bfloat16
            if weight.dtype == torch.bfloat16 else tl.float16,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=num_warps, num_stages=num_stages,
            **pdl_options())
    return out


def add_norm_linear(hidden: Optional[torch.Tensor], residual: Optional[torch.Tensor], norm_weight, eps, weight,
                    bias=None, residual_dtype: Optional[torch.dtype] = None, config=None):
    """A pre-norm block's entry and its first linear layer, for one token per row.

    residual' = residual + hidden (hidden alone when residual is None; residual alone when hidden is None, as after
    a fused layer that already added its output), kept in residual_dtype; returns (linear(RMSNorm(residual')),
    residual'). hidden, residual: (batch, K); weight: (N, K). With residual_dtype None and hidden given, residual'
    is not stored (returned as None): the LM head needs only the output."""
    if hidden is None and residual is None:
        raise ValueError("add_norm_linear: hidden and residual are both None")
    if hidden is None:
        return _launch(residual, weight, norm_weight, eps, bias=bias, config=config), residual
    r_out = None
    if residual_dtype is not None:
        r_out = torch.empty(hidden.shape, device=hidden.device, dtype=residual_dtype)
    out = _launch(hidden, weight, norm_weight, eps, residual=residual, r_out=r_out, bias=bias, config=config)
    return out, r_out


def gated_norm_linear(y, z, norm_weight, eps, ngroups, norm_before_gate, weight, bias=None,
                      residual: Optional[torch.Tensor] = None, config=None):
    """out = linear(gated_rmsnorm(y, z)) for one token per row (mamba_ssm's RMSNormGated over `ngroups` groups of
    channels, then out_proj); with `residual`, also residual += out in place (out rounded to weight's dtype first).
    y, z: (batch, K); weight: (N, K); residual: (batch, N). Returns out (batch, N) in weight's dtype."""
    return _launch(y, weight, norm_weight, eps, z=z, ngroups=ngroups, norm_before_gate=norm_before_gate, bias=bias,
                   accumulate=residual, config=config)
