"""A large-batch decode step as a pipeline of row groups: one launch per stage, three roles in each launch.

At batch 64 a Mamba-2 layer's step is a chain [add + RMSNorm, in_proj, conv, state update, out_proj] in which the
state update streams the layer's SSM states (bandwidth-bound: 25 MB read and written for mamba2-130m) and every
other kernel is latency-bound (2-5 µs each, whatever it computes), so the memory idles while the small kernels
run and the SMs idle while the states stream (BENCHMARKS.md, "Decoding"). Rows are independent, so here the batch
is split into up to three row groups and each group walks the layers in three stages:

    I  in_proj of RMSNorm(residual): its input tile is a = residual * norm weight (left by the previous O
       stage), the norm's rstd (from the O stage's partial sums of squares) scales the product afterwards; the
       conv step + SiLU runs in its epilogue on the xBC columns (the conv states as rings: this token's input
       goes to the oldest slot, which no one reads this step)
    S  the SSM state update (state_update.state_tile_update), the gated RMSNorm folded: u = y silu(z) w and
       partial sums of squares of y silu(z)
    O  out_proj of u, scaled by the gated norm's rstd, added to the residual in place; then the next norm's input
       a for its columns and their partial sums of squares (the residual rounded as that norm reads it)

Launch t runs stage (t - g) mod 3 of layer (t - g) // 3 for each group g, so in the steady state every launch has
one group in each role: the state programs of one group stream while the product programs of the other two run
beside them, in the same grid (roles by program id: I first, then O, then S), with no dependency inside a launch
(the roles touch different rows). Kernel boundaries are the only synchronisation: a group's stage reads what its
previous stage wrote one launch earlier. So a layer costs three launches, each about a third of the state stream,
instead of a full state stream plus four latency-bound kernels.

Rounding follows the unfused folded path (state_update.add_rmsnorm with hidden_rms) but for where the norm's rstd
is applied: out_proj's product is rounded to the weight's dtype, then scaled by the gated norm's rstd and added to
the residual (kept in its own dtype); the norm reads the residual rounded to its weight's dtype; in_proj multiplies
(residual * weight) rounded to the weight's dtype and applies rstd to the float32 product (the unfused path rounds
residual * rstd * weight). The partial sums add up in a fixed order (deterministic). Every role waits on the
previous launch (PDL) before it reads activations; the state role loads its state tile, and in_proj its ring
history, before that wait. Measured on an H100 (BENCHMARKS.md, "Decode step"): 0.783 / 1.972 ms per step at batch
64 for mamba2-130m / -370m against 0.896 / 2.158 for the unpipelined step; notes/decode.md has the versions that lost
and what each role costs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .pdl import options as pdl_options, release_early, wait_and_release
from . import state_update
from .state_update import state_tile_update

# the interpreter multiplies bfloat16 as raw bits (numpy has no bfloat16): it gets float32 dot operands (the same
# products: the operands are rounded to the weight's dtype first)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# (BLOCK_N, BLOCK_K) of the in_proj and out_proj roles' tiles; num_warps and num_stages of the launch. H100
# (sm_90) at batch 64, the fastest measured: whole captured steps of mamba2-130m / -370m took
# 0.957 / 2.118 ms with (64, 128) / (32, 128), 0.795 / 2.074 with (32, 128) / (16, 128) (smaller tiles: fewer
# registers, so more state programs per SM), 1.02 / 2.17 with K tiles of 256 for both, and 0.784 / 1.971 with
# out_proj's K tile 256 (its K loop is d_inner long) and the weights' evict_last hint (which alone changed nothing)
IN_TILE = (32, 128)
OUT_TILE = (16, 256)
NUM_WARPS = 4
NUM_STAGES = 3
# the product roles' eviction hint for weight loads: the three row groups read a layer's weights in three
# consecutive launches, with a third of the states streaming through L2 between them
WEIGHT_EVICT = "evict_last"
# register cap of the launch (None: Triton's choice): the state role's occupancy follows the product roles' needs
MAXNREG = None


@triton.jit
def _rows_times_weight(a_ptr, a_b, rws, mask_m, w_ptr, w_n, offs_n, mask_n, K, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, W_EVICT: tl.constexpr):
    """a[rws, :K] @ W[offs_n, :K]^T in float32, (BLOCK_M, BLOCK_N): W an nn.Linear weight (N, K), a in W's dtype."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mk = kk < K
        a = tl.load(a_ptr + rws[:, None] * a_b + kk[None, :], mask=mask_m[:, None] & mk[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * w_n + kk[:, None], mask=mk[:, None] & mask_n[None, :], other=0.0,
                    eviction_policy=W_EVICT)
        if DOT_F32:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32))
        else:
            acc = tl.dot(a.to(w_ptr.dtype.element_ty), w, acc)
    return acc


@triton.jit
def _row_partials(ss_ptr, ss_b, rws, mask_m, n_part, BLOCK_PART: tl.constexpr):
    """The rows' partial sums of squares, (BLOCK_M, BLOCK_PART) float32 (zeros past n_part)."""
    po = tl.arange(0, BLOCK_PART)
    return tl.load(ss_ptr + rws[:, None] * ss_b + po[None, :], mask=mask_m[:, None] & (po < n_part)[None, :],
                   other=0.0)


@triton.jit
def _in_proj_tile(j, row0, rows, a_ptr, ssr_ptr, w_ptr, bias_ptr, out_ptr, ring_ptr, slot_ptr, cw_ptr, cb_ptr,
                  K, N, n_part, inv_k, eps, d_ssm, conv_dim, a_b, ssr_b, w_n, o_b, r_b, r_c, r_w, cw_c, cw_w,
                  HAS_BIAS: tl.constexpr, WIDTH: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_PART: tl.constexpr, DOT_F32: tl.constexpr,
                  W_EVICT: tl.constexpr, USE_PDL: tl.constexpr):
    """Stage I, output columns block j of [z, xBC, dt] for rows row0 .. row0 + rows: the norm's input a (the
    residual rounded to the norm weight's dtype, times that weight: what the O stage left) @ W_in^T, times the
    norm's rstd (from the O stage's partial sums), + bias; xBC columns then go through the conv step: this
    token's raw value into its ring slot, the conv over the ring's older inputs (loaded before the wait) + SiLU."""
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < rows
    rws = row0 + offs_m
    offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    c = offs_n - d_ssm  # conv channel of an xBC column
    is_conv = (c >= 0) & (c < conv_dim)
    mc = mask_m[:, None] & is_conv[None, :]
    # before the wait: the ring's older inputs (this token's slot is the oldest: nobody reads it this step)
    slot = tl.load(slot_ptr) % WIDTH
    conv = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_CONV_BIAS:
        conv += tl.load(cb_ptr + c, mask=is_conv, other=0.0).to(tl.float32)[None, :]
    ring = ring_ptr + rws[:, None] * r_b + c[None, :] * r_c
    for k in tl.static_range(WIDTH - 1):
        older = tl.load(ring + ((slot + 1 + k) % WIDTH) * r_w, mask=mc, other=0.0).to(tl.float32)
        conv += older * tl.load(cw_ptr + c * cw_c + k * cw_w, mask=is_conv, other=0.0).to(tl.float32)[None, :]
    w_last = tl.load(cw_ptr + c * cw_c + (WIDTH - 1) * cw_w, mask=is_conv, other=0.0).to(tl.float32)
    wait_and_release(USE_PDL)
    part = _row_partials(ssr_ptr, ssr_b, rws, mask_m, n_part, BLOCK_PART)  # (used after the product)
    acc = _rows_times_weight(a_ptr, a_b, rws, mask_m, w_ptr, w_n, offs_n, mask_n, K, BLOCK_M, BLOCK_N, BLOCK_K,
                             DOT_F32, W_EVICT)
    acc *= (1.0 / tl.sqrt(tl.sum(part, axis=1) * inv_k + eps))[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    raw = acc.to(out_ptr.dtype.element_ty)  # in_proj's output, as the unfused path stores it
    tl.store(ring + slot * r_w, raw.to(ring_ptr.dtype.element_ty), mask=mc)
    conv += raw.to(tl.float32) * w_last[None, :]
    conv = conv * tl.sigmoid(conv)
    out = tl.where(is_conv[None, :], conv.to(out_ptr.dtype.element_ty), raw)
    tl.store(out_ptr + rws[:, None] * o_b + offs_n[None, :], out, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _out_proj_tile(j, row0, rows, u_ptr, ssg_ptr, w_ptr, res_ptr, nw_ptr, a_ptr, ssr_ptr, K, N, n_gpart, inv_k,
                   eps, u_b, ssg_b, w_n, res_b, a_b, ssr_b, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_GPART: tl.constexpr, DOT_F32: tl.constexpr, W_EVICT: tl.constexpr,
                   USE_PDL: tl.constexpr):
    """Stage O, residual columns block j: residual += rstd_gated * (u @ W_out^T), rstd_gated from the state
    stage's partial sums; then the next norm's input for these columns, a = residual (rounded to the norm weight's
    dtype) * the next norm's weight, and its partial sum of squares into slot j."""
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < rows
    rws = row0 + offs_m
    offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    nw = tl.load(nw_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    wait_and_release(USE_PDL)
    part = _row_partials(ssg_ptr, ssg_b, rws, mask_m, n_gpart, BLOCK_GPART)  # (used after the product)
    acc = _rows_times_weight(u_ptr, u_b, rws, mask_m, w_ptr, w_n, offs_n, mask_n, K, BLOCK_M, BLOCK_N, BLOCK_K,
                             DOT_F32, W_EVICT)
    mask = mask_m[:, None] & mask_n[None, :]
    rstd = 1.0 / tl.sqrt(tl.sum(part, axis=1) * inv_k + eps)
    out = acc.to(w_ptr.dtype.element_ty).to(tl.float32) * rstd[:, None]  # rounded as out_proj's output
    r_ptrs = res_ptr + rws[:, None] * res_b + offs_n[None, :]
    r = (tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32) + out).to(res_ptr.dtype.element_ty)
    tl.store(r_ptrs, r, mask=mask)
    _next_norm_input(r, nw, rws, offs_n, j, mask, mask_m, nw_ptr, a_ptr, ssr_ptr, a_b, ssr_b)


@triton.jit
def _next_norm_input(r, nw, rws, offs_n, j, mask, mask_m, nw_ptr, a_ptr, ssr_ptr, a_b, ssr_b):
    """The next block's RMSNorm input for these residual columns: a = r (rounded to the norm weight's dtype, as
    the norm reads it) * weight, rounded to the weight's dtype, and the partial sum of squares into slot j."""
    rn = tl.where(mask, r.to(nw_ptr.dtype.element_ty).to(tl.float32), 0.0)
    tl.store(ssr_ptr + rws * ssr_b + j, tl.sum(rn * rn, axis=1), mask=mask_m)
    tl.store(a_ptr + rws[:, None] * a_b + offs_n[None, :], (rn * nw[None, :]).to(a_ptr.dtype.element_ty), mask=mask)


# The step's launches differ in these numbers only: not specialised (on divisibility by 16 or equality to 1), so
# that they share a few compiled kernels. Measured on an H100 (decode run 21): capturing the batch-64 step took
# 1.7-2.9 s instead of 22-28 s, same step time.
_PER_LAUNCH = ["n_in", "n_out", "i_row0", "i_rows", "o_row0", "o_rows", "s_row0"]


@triton.jit(do_not_specialize=_PER_LAUNCH)
def _pipeline_kernel(
    n_in, n_out,
    # stage I
    i_row0, i_rows, w_in_ptr, b_in_ptr, ring_ptr, slot_ptr, cw_ptr, cb_ptr, norm_eps,
    # stage O
    o_row0, o_rows, w_out_ptr, nw_next_ptr, gnorm_eps,
    # stage S
    s_row0, state_ptr, A_log_ptr, D_ptr, dtb_ptr, gnw_ptr, dt_min, dt_max,
    # buffers shared by the stages
    res_ptr, a_ptr, ssr_ptr, zx_ptr, u_ptr, ssg_ptr,
    d_model, n_zx, d_ssm, conv_dim, nheads, headdim, dstate, heads_per_group, n_res_part, n_g_part, inv_d_model,
    inv_d_ssm,
    res_b, a_b, ssr_b, zx_b, u_b, ssg_b, w_in_n, w_out_n, s_b, s_h, s_p, s_n, r_b, r_c, r_w, cw_c, cw_w, D_h, D_p,
    HAS_IN_BIAS: tl.constexpr, WIDTH: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    HAS_LIMIT: tl.constexpr, BLOCK_M: tl.constexpr, IN_N: tl.constexpr, IN_K: tl.constexpr, OUT_N: tl.constexpr,
    OUT_K: tl.constexpr, BLOCK_PART: tl.constexpr, BLOCK_GPART: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, EVICT: tl.constexpr, W_EVICT: tl.constexpr, DOT_F32: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # what a role reads before its wait (a state tile, the ring's older inputs, weights) is written by no launch
    # of this step, so the next launch may start at once (pdl.py)
    release_early(USE_PDL)
    pid = tl.program_id(0)
    if pid < n_in:
        _in_proj_tile(pid, i_row0, i_rows, a_ptr, ssr_ptr, w_in_ptr, b_in_ptr, zx_ptr, ring_ptr, slot_ptr, cw_ptr,
                      cb_ptr, d_model, n_zx, n_res_part, inv_d_model, norm_eps, d_ssm, conv_dim, a_b, ssr_b, w_in_n,
                      zx_b, r_b, r_c, r_w, cw_c, cw_w, HAS_IN_BIAS, WIDTH, HAS_CONV_BIAS, BLOCK_M, IN_N, IN_K,
                      BLOCK_PART, DOT_F32, W_EVICT, USE_PDL)
    elif pid < n_in + n_out:
        _out_proj_tile(pid - n_in, o_row0, o_rows, u_ptr, ssg_ptr, w_out_ptr, res_ptr, nw_next_ptr, a_ptr, ssr_ptr,
                       d_ssm, d_model, n_g_part, inv_d_ssm, gnorm_eps, u_b, ssg_b, w_out_n, res_b, a_b, ssr_b,
                       BLOCK_M, OUT_N, OUT_K, BLOCK_GPART, DOT_F32, W_EVICT, USE_PDL)
    else:
        q = pid - n_in - n_out
        slot = q % n_g_part  # = h * p_blocks + p_block: the tile's partial-sum slot in its row
        p_blocks = n_g_part // nheads
        xbc = zx_ptr + d_ssm  # zx rows hold [z, xBC (after the conv), dt]
        state_tile_update(s_row0 + q // n_g_part, slot // p_blocks, slot % p_blocks, slot, state_ptr, xbc,
                          xbc + conv_dim, A_log_ptr, xbc + d_ssm, xbc + d_ssm + (conv_dim - d_ssm) // 2, D_ptr,
                          zx_ptr, dtb_ptr, u_ptr, gnw_ptr, ssg_ptr, headdim, dstate, heads_per_group, dt_min, dt_max,
                          s_b, s_h, s_p, s_n, zx_b, headdim, 1, zx_b, 1, zx_b, dstate, 1, zx_b, dstate, 1, D_h, D_p,
                          zx_b, headdim, 1, u_b, headdim, 1, ssg_b, True, True, HAS_DT_BIAS, True, HAS_LIMIT, True,
                          True, BLOCK_P, BLOCK_N, USE_PDL, EVICT)


@dataclass
class PipelineBuffers:
    """The activations the stages hand each other, one row per batch row: the residual (its dtype), the next
    norm's input a (residual * norm weight, the weight's dtype) with its partial sums of squares (float32, one slot
    per O-stage column block), in_proj's output [z, xBC after the conv, dt], the folded gated norm's u and its
    partial sums (one slot per state tile of a row)."""

    residual: torch.Tensor
    norm_input: torch.Tensor
    res_sumsq: torch.Tensor
    zx: torch.Tensor
    u: torch.Tensor
    u_sumsq: torch.Tensor

    @classmethod
    def allocate(cls, batch, d_model, d_ssm, n_zx, nheads, headdim, dstate, dtype, residual_dtype, device):
        p_blocks = triton.cdiv(headdim, _block_p(headdim, dstate))
        f32 = dict(dtype=torch.float32, device=device)
        return cls(torch.zeros(batch, d_model, dtype=residual_dtype, device=device),
                   torch.zeros(batch, d_model, dtype=dtype, device=device),
                   torch.zeros(batch, triton.cdiv(d_model, OUT_TILE[0]), **f32),
                   torch.zeros(batch, n_zx, dtype=dtype, device=device),
                   torch.zeros(batch, d_ssm, dtype=dtype, device=device),
                   torch.zeros(batch, nheads * p_blocks, **f32))


def _block_p(headdim, dstate):
    # (state_update.STATE_TILE read at call time: benchmarks patch it)
    return state_update.state_block_p(headdim, dstate, state_update.STATE_TILE[0])


@dataclass
class MixerWeights:
    """One Mamba-2 block's tensors as the stages read them (a gated norm of one group, gate before the norm, no
    out_proj bias, no channels beside the SSM: Mamba2Mixer.norm_commutes), and the weight of the norm that comes
    after the block (the next block's, or the final norm's)."""

    in_weight: torch.Tensor
    in_bias: Optional[torch.Tensor]
    norm_eps: float
    conv_weight: torch.Tensor  # (conv_dim, width)
    conv_bias: Optional[torch.Tensor]
    A_log: torch.Tensor
    D: torch.Tensor  # (nheads,) or (nheads, headdim)
    dt_bias: Optional[torch.Tensor]
    dt_limit: tuple
    gnorm_weight: torch.Tensor
    gnorm_eps: float
    out_weight: torch.Tensor
    ngroups: int
    next_norm_weight: torch.Tensor


def prepare_stage(bufs: PipelineBuffers, nheads: int, headdim: int, dstate: int, block_m: int,
                  in_role, out_role, state_role):
    """The arguments of one launch, checked once here so that launch_stage does nothing else. in_role = (row0,
    rows, MixerWeights, conv ring (batch, conv_dim, width), slot (0-dim int64: the ring slot of this token)) runs
    stage I on those rows, out_role = (row0, rows, MixerWeights) stage O, state_role = (row0, rows, MixerWeights,
    ssm_state (batch, nheads, headdim, dstate)) stage S. A role with 0 rows has no programs (its tensors still set
    the launch's dtypes, so give a real layer's)."""
    res, zx = bufs.residual, bufs.zx
    batch, d_model = res.shape
    d_ssm = nheads * headdim
    n_zx = zx.shape[1]
    n_res_part, n_g_part = bufs.res_sumsq.shape[1], bufs.u_sumsq.shape[1]
    IN_N, IN_K = IN_TILE
    OUT_N, OUT_K = OUT_TILE
    i_row0, i_rows, iw, ring, slot = in_role
    o_row0, o_rows, ow = out_role
    s_row0, s_rows, sw, state = state_role
    for row0, rows in ((i_row0, i_rows), (o_row0, o_rows), (s_row0, s_rows)):
        if rows > block_m or row0 + rows > batch:
            raise ValueError(f"prepare_stage: rows {row0}..{row0 + rows} do not fit (batch {batch}, tile {block_m})")
    conv_dim = n_zx - d_ssm - nheads
    if state.shape != (batch, nheads, headdim, dstate) or ring.shape[:2] != (batch, conv_dim):
        raise ValueError(f"prepare_stage: state {tuple(state.shape)} / ring {tuple(ring.shape)} disagree with "
                         f"the buffers (batch {batch}, {nheads} heads x {headdim} x {dstate}, {conv_dim} conv "
                         f"channels)")
    n_in = triton.cdiv(n_zx, IN_N) if i_rows else 0
    n_out = triton.cdiv(d_model, OUT_N) if o_rows else 0
    n_state = s_rows * n_g_part
    D = sw.D
    D_h, D_p = (D.stride(0), 0) if D.dim() == 1 else (D.stride(0), D.stride(1))
    dt_limit = tuple(sw.dt_limit)
    args = (
        n_in, n_out,
        i_row0, i_rows, iw.in_weight, iw.in_bias if iw.in_bias is not None else iw.in_weight, ring, slot,
        iw.conv_weight, iw.conv_bias if iw.conv_bias is not None else iw.conv_weight, float(iw.norm_eps),
        o_row0, o_rows, ow.out_weight, ow.next_norm_weight, float(ow.gnorm_eps),
        s_row0, state, sw.A_log, D, sw.dt_bias if sw.dt_bias is not None else sw.A_log, sw.gnorm_weight,
        float(dt_limit[0]), float(min(dt_limit[1], 3.0e38)),
        res, bufs.norm_input, bufs.res_sumsq, zx, bufs.u, bufs.u_sumsq,
        d_model, n_zx, d_ssm, conv_dim, nheads, headdim, dstate, nheads // sw.ngroups, n_res_part, n_g_part,
        1.0 / d_model, 1.0 / d_ssm,
        res.stride(0), bufs.norm_input.stride(0), bufs.res_sumsq.stride(0), zx.stride(0), bufs.u.stride(0),
        bufs.u_sumsq.stride(0), iw.in_weight.stride(0), ow.out_weight.stride(0), *state.stride(), *ring.stride(),
        *iw.conv_weight.stride(), D_h, D_p)
    constexprs = dict(
        HAS_IN_BIAS=iw.in_bias is not None, WIDTH=iw.conv_weight.shape[1], HAS_CONV_BIAS=iw.conv_bias is not None,
        HAS_DT_BIAS=sw.dt_bias is not None, HAS_LIMIT=dt_limit != (0.0, float("inf")),
        BLOCK_M=block_m, IN_N=IN_N, IN_K=IN_K, OUT_N=OUT_N, OUT_K=OUT_K,
        BLOCK_PART=triton.next_power_of_2(n_res_part), BLOCK_GPART=triton.next_power_of_2(n_g_part),
        BLOCK_P=_block_p(headdim, dstate), BLOCK_N=triton.next_power_of_2(dstate), EVICT=state_update.STATE_EVICT,
        W_EVICT=WEIGHT_EVICT,
        DOT_F32=_INTERPRET, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        **({} if MAXNREG is None or _INTERPRET else dict(maxnreg=MAXNREG)))
    return (n_in + n_out + n_state,), args, constexprs


def launch_stage(stage):
    """Launch a prepare_stage result (with PDL where kernels/pdl.py's launching() has it on)."""
    grid, args, constexprs = stage
    _pipeline_kernel[grid](*args, **constexprs, **pdl_options(early=True))


@triton.jit
def _embed_kernel(tok_ptr, emb_ptr, nw_ptr, res_ptr, a_ptr, ssr_ptr, d_model, n_part, emb_v, res_b, a_b, ssr_b,
                  BLOCK: tl.constexpr, BLOCK_PART: tl.constexpr, USE_PDL: tl.constexpr):
    """The first block's inputs: the residual (the token's embedding row, in the residual's dtype), the norm's
    input a = residual * weight and its sum of squares in partial slot 0 (zeros in the others)."""
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < d_model
    nw = tl.load(nw_ptr + offs, mask=m, other=0.0).to(tl.float32)
    wait_and_release(USE_PDL)
    tok = tl.load(tok_ptr + b)
    r = tl.load(emb_ptr + tok * emb_v + offs, mask=m, other=0.0).to(res_ptr.dtype.element_ty)
    tl.store(res_ptr + b * res_b + offs, r, mask=m)
    rn = r.to(nw_ptr.dtype.element_ty).to(tl.float32)
    tl.store(a_ptr + b * a_b + offs, (rn * nw).to(a_ptr.dtype.element_ty), mask=m)
    po = tl.arange(0, BLOCK_PART)
    tl.store(ssr_ptr + b * ssr_b + po, tl.where(po == 0, tl.sum(rn * rn, axis=0), 0.0), mask=po < n_part)


def embed_rows(token: torch.Tensor, embedding: torch.Tensor, norm_weight: torch.Tensor, bufs: PipelineBuffers):
    """The first I stage's inputs for token (batch,): bufs.residual = embedding[token], and the norm's input."""
    batch, d_model = bufs.residual.shape
    n_part = bufs.res_sumsq.shape[1]
    _embed_kernel[(batch,)](token, embedding, norm_weight, bufs.residual, bufs.norm_input, bufs.res_sumsq, d_model,
                            n_part, embedding.stride(0), bufs.residual.stride(0), bufs.norm_input.stride(0),
                            bufs.res_sumsq.stride(0), BLOCK=triton.next_power_of_2(d_model),
                            BLOCK_PART=triton.next_power_of_2(n_part), num_warps=4, **pdl_options())
