"""A large-batch decode step as a pipeline of row groups: one launch per stage, three roles in each launch.

At batch 64 a Mamba-2 layer's step is a chain [add + RMSNorm, in_proj, conv, state update, out_proj] in which the
state update streams the layer's SSM states (bandwidth-bound: 25 MB read and written for mamba2-130m) and every
other kernel is latency-bound (2-5 µs each, whatever it computes), so the memory idles while the small kernels
run and the SMs idle while the states stream (BENCHMARKS.md, "Decoding"). Rows are independent, so here the batch
is split into up to three row groups and each group walks the layers in three stages:

    I  in_proj of the RMSNorm of the residual (norm weight and rstd applied as the input tile loads; the rstd
       from the partial sums of squares the previous O stage left)
    S  conv (ring, kernels/state_update.mixer_tile) + SSM state update, the gated RMSNorm folded: u = y silu(z) w
       and partial sums of squares of y silu(z)
    O  out_proj of u, scaled by the gated norm's rstd, added to the residual in place, and the partial sums of
       squares of the new residual (rounded as the next norm reads it) for the next I stage

Launch t runs stage (t - g) mod 3 of layer (t - g) // 3 for each group g, so in the steady state every launch has
one group in each role: the state programs of one group stream while the product programs of the other two run
beside them, in the same grid (roles by program id: I first, then O, then S), with no dependency inside a launch
(the roles touch different rows). Kernel boundaries are the only synchronisation: a group's stage reads what its
previous stage wrote one launch earlier. So a layer costs three launches, each about a third of the state stream,
instead of a full state stream plus four latency-bound kernels.

Rounding follows the unfused folded path (state_update.add_rmsnorm with hidden_rms): out_proj's product is rounded
to the weight's dtype, then scaled by the gated norm's rstd and added to the residual (kept in its own dtype); the
norm reads the residual rounded to its weight's dtype, and its output is rounded to the weight's dtype before
in_proj. The partial sums add up in a fixed order (deterministic). Every role waits on the previous launch (PDL)
before it reads activations; the state role loads its state tile and ring history before that wait.
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
from .state_update import mixer_history, mixer_update

# the interpreter multiplies bfloat16 as raw bits (numpy has no bfloat16): it gets float32 dot operands (the same
# products: the operands are rounded to the weight's dtype first)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# (BLOCK_N, BLOCK_K) of the in_proj and out_proj roles' tiles; num_warps and num_stages of the launch
IN_TILE = (64, 128)
OUT_TILE = (32, 128)
NUM_WARPS = 4
NUM_STAGES = 3
# programs per SM that walk a launch's state tiles (see _state_programs)
STATE_PROGRAMS_PER_SM = 2


@triton.jit
def _in_proj_tile(j, row0, rows, res_ptr, nw_ptr, w_ptr, bias_ptr, out_ptr, K, N, inv_k, eps, res_b, w_n, o_b,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  DOT_F32: tl.constexpr, USE_PDL: tl.constexpr):
    """Stage I, output columns block j for rows row0 .. row0 + rows: RMSNorm(residual) @ W_in^T (+ bias). The
    norm's rstd is one number per row, so it scales the product afterwards: the row's sum of squares adds up in
    the same loop that feeds the product, and nothing waits for it before the loop."""
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < rows
    rws = row0 + offs_m
    offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    wait_and_release(USE_PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    ss = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mk = kk < K
        a = tl.load(res_ptr + rws[:, None] * res_b + kk[None, :], mask=mask_m[:, None] & mk[None, :], other=0.0)
        a = a.to(nw_ptr.dtype.element_ty).to(tl.float32)  # the norm reads the residual in its weight's dtype
        ss += tl.sum(a * a, axis=1)
        a = (a * tl.load(nw_ptr + kk, mask=mk, other=0.0).to(tl.float32)[None, :]).to(w_ptr.dtype.element_ty)
        w = tl.load(w_ptr + offs_n[None, :] * w_n + kk[:, None], mask=mk[:, None] & mask_n[None, :], other=0.0)
        if DOT_F32:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32))
        else:
            acc = tl.dot(a, w, acc)
    acc *= (1.0 / tl.sqrt(ss * inv_k + eps))[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rws[:, None] * o_b + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _out_proj_tile(j, row0, rows, u_ptr, ssg_ptr, w_ptr, res_ptr, K, N, n_gpart, inv_k, eps, u_b, ssg_b, w_n, res_b,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_GPART: tl.constexpr,
                   DOT_F32: tl.constexpr, USE_PDL: tl.constexpr):
    """Stage O, residual columns block j: residual += rstd_gated * (u @ W_out^T), rstd_gated from the state
    stage's partial sums (loaded before the product, used after it)."""
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < rows
    rws = row0 + offs_m
    offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    wait_and_release(USE_PDL)
    po = tl.arange(0, BLOCK_GPART)
    part = tl.load(ssg_ptr + rws[:, None] * ssg_b + po[None, :], mask=mask_m[:, None] & (po < n_gpart)[None, :],
                   other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mk = kk < K
        a = tl.load(u_ptr + rws[:, None] * u_b + kk[None, :], mask=mask_m[:, None] & mk[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * w_n + kk[:, None], mask=mk[:, None] & mask_n[None, :], other=0.0)
        if DOT_F32:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32))
        else:
            acc = tl.dot(a.to(w_ptr.dtype.element_ty), w, acc)
    mask = mask_m[:, None] & mask_n[None, :]
    rstd = 1.0 / tl.sqrt(tl.sum(part, axis=1) * inv_k + eps)
    out = acc.to(w_ptr.dtype.element_ty).to(tl.float32) * rstd[:, None]  # rounded as out_proj's output
    r_ptrs = res_ptr + rws[:, None] * res_b + offs_n[None, :]
    r = tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32) + out
    tl.store(r_ptrs, r.to(res_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _state_tile_at(t, s_row0, n_tiles, p_blocks, nheads, state_ptr, headdim, dstate, s_b, s_h, s_p, s_n,
                   BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile t of the state role: its row, head, headdim block, pointers and mask (all-false past the last)."""
    b = s_row0 + t // (nheads * p_blocks)
    h = (t // p_blocks) % nheads
    pb = t % p_blocks
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    live = (offs_p < headdim) & (offs_p * 0 + t < n_tiles)  # (as a tensor: the interpreter's masks must be)
    mask = live[:, None] & (offs_n < dstate)[None, :]
    ptrs = state_ptr + b * s_b + h * s_h + offs_p[:, None] * s_p + offs_n[None, :] * s_n
    return b, h, pb, offs_p, offs_n, ptrs, mask


@triton.jit
def _state_role(q, n_s, s_row0, n_tiles, state_ptr, ring_ptr, slot_ptr, xbc_ptr, cw_ptr, cb_ptr, dt_ptr, A_log_ptr,
                D_ptr, z_ptr, dtb_ptr, out_ptr, nw_ptr, ss_ptr, nheads, headdim, dstate, heads_per_group, d_ssm,
                ngroups, dt_min, dt_max, s_b, s_h, s_p, s_n, r_b, r_c, r_w, xbc_b, cw_c, cw_w, D_h, D_p, o_b,
                ss_b, WIDTH: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, HAS_D: tl.constexpr,
                HAS_DT_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                EVICT: tl.constexpr, USE_PDL: tl.constexpr):
    """Stage S: program q of n_s walks tiles q, q + n_s, ... (rows of the group x heads x headdim blocks), each
    a mixer tile (state_update.mixer_tile's work), with the next tile's state already in flight while it works
    on one; the first tile's state loads before the PDL wait."""
    p_blocks = tl.cdiv(headdim, BLOCK_P)
    _, _, _, _, _, ptrs, mask = _state_tile_at(q, s_row0, n_tiles, p_blocks, nheads, state_ptr, headdim, dstate,
                                               s_b, s_h, s_p, s_n, BLOCK_P, BLOCK_N)
    st = tl.load(ptrs, mask=mask, other=0.0, eviction_policy=EVICT)
    wait_and_release(USE_PDL)
    for t in range(q, n_tiles, n_s):
        b, h, pb, offs_p, offs_n, ptrs, mask = _state_tile_at(t, s_row0, n_tiles, p_blocks, nheads, state_ptr,
                                                              headdim, dstate, s_b, s_h, s_p, s_n, BLOCK_P, BLOCK_N)
        _, _, _, _, _, ptrs_next, mask_next = _state_tile_at(t + n_s, s_row0, n_tiles, p_blocks, nheads, state_ptr,
                                                             headdim, dstate, s_b, s_h, s_p, s_n, BLOCK_P, BLOCK_N)
        st_next = tl.load(ptrs_next, mask=mask_next, other=0.0, eviction_policy=EVICT)
        mask_p = offs_p < headdim
        mask_n = offs_n < dstate
        g = h // heads_per_group
        x, Bv, Cv, wx, wB, wC, A, dt_bias, Dv, slot = mixer_history(
            b, h, g, offs_p, offs_n, mask_p, mask_n, ring_ptr, slot_ptr, cw_ptr, cb_ptr, A_log_ptr, D_ptr, dtb_ptr,
            headdim, dstate, d_ssm, ngroups, r_b, r_c, r_w, cw_c, cw_w, D_h, D_p, BLOCK_P, BLOCK_N, WIDTH,
            HAS_CONV_BIAS, HAS_D, HAS_DT_BIAS)
        # zx rows hold [z, xBC, dt]; u rows [nheads x headdim]
        mixer_update(st.to(tl.float32), ptrs, mask, b, h, g, pb, h * p_blocks + pb, offs_p, offs_n, mask_p, mask_n,
                     x, Bv, Cv, wx, wB, wC, A, dt_bias, Dv, slot, ring_ptr, xbc_ptr, dt_ptr, z_ptr, out_ptr, nw_ptr,
                     ss_ptr, headdim, dstate, heads_per_group, d_ssm, ngroups, dt_min, dt_max, r_b, r_c, r_w, xbc_b,
                     1, xbc_b, 1, xbc_b, headdim, 1, o_b, headdim, 1, ss_b, WIDTH, HAS_D, True, HAS_DT_BIAS,
                     HAS_LIMIT, True, EVICT)
        st = st_next


@triton.jit
def _pipeline_kernel(
    n_in, n_out,
    # stage I
    i_row0, i_rows, nw_ptr, w_in_ptr, b_in_ptr, norm_eps,
    # stage O
    o_row0, o_rows, w_out_ptr, gnorm_eps,
    # stage S
    s_row0, s_tiles, state_ptr, ring_ptr, slot_ptr, cw_ptr, cb_ptr, A_log_ptr, D_ptr, dtb_ptr, gnw_ptr, dt_min,
    dt_max,
    # buffers shared by the stages
    res_ptr, zx_ptr, u_ptr, ssg_ptr,
    d_model, n_zx, d_ssm, nheads, headdim, dstate, heads_per_group, ngroups, n_g_part, inv_d_model, inv_d_ssm,
    res_b, zx_b, u_b, ssg_b, w_in_n, w_out_n, s_b, s_h, s_p, s_n, r_b, r_c, r_w, cw_c, cw_w, D_h, D_p,
    HAS_IN_BIAS: tl.constexpr, WIDTH: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, HAS_D: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    BLOCK_M: tl.constexpr, IN_N: tl.constexpr, IN_K: tl.constexpr, OUT_N: tl.constexpr, OUT_K: tl.constexpr,
    BLOCK_GPART: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, EVICT: tl.constexpr,
    DOT_F32: tl.constexpr, USE_PDL: tl.constexpr,
):
    # everything a role reads before its wait (a state tile) is written by no launch of this step, so the next
    # launch may start at once (pdl.py)
    release_early(USE_PDL)
    pid = tl.program_id(0)
    if pid < n_in:
        _in_proj_tile(pid, i_row0, i_rows, res_ptr, nw_ptr, w_in_ptr, b_in_ptr, zx_ptr, d_model, n_zx, inv_d_model,
                      norm_eps, res_b, w_in_n, zx_b, HAS_IN_BIAS, BLOCK_M, IN_N, IN_K, DOT_F32, USE_PDL)
    elif pid < n_in + n_out:
        _out_proj_tile(pid - n_in, o_row0, o_rows, u_ptr, ssg_ptr, w_out_ptr, res_ptr, d_ssm, d_model, n_g_part,
                       inv_d_ssm, gnorm_eps, u_b, ssg_b, w_out_n, res_b, BLOCK_M, OUT_N, OUT_K, BLOCK_GPART,
                       DOT_F32, USE_PDL)
    else:
        _state_role(pid - n_in - n_out, tl.num_programs(0) - n_in - n_out, s_row0, s_tiles, state_ptr, ring_ptr,
                    slot_ptr, zx_ptr + d_ssm, cw_ptr, cb_ptr, zx_ptr + d_ssm + d_ssm + 2 * ngroups * dstate,
                    A_log_ptr, D_ptr, zx_ptr, dtb_ptr, u_ptr, gnw_ptr, ssg_ptr, nheads, headdim, dstate,
                    heads_per_group, d_ssm, ngroups, dt_min, dt_max, s_b, s_h, s_p, s_n, r_b, r_c, r_w, zx_b, cw_c,
                    cw_w, D_h, D_p, u_b, ssg_b, WIDTH, HAS_CONV_BIAS, HAS_D, HAS_DT_BIAS, HAS_LIMIT, BLOCK_P,
                    BLOCK_N, EVICT, USE_PDL)


@dataclass
class PipelineBuffers:
    """The activations the stages hand each other, one row per batch row: the residual (its dtype), in_proj's
    output [z, xBC, dt], the folded gated norm's u and its partial sums (float32, one slot per state tile of a
    row)."""

    residual: torch.Tensor
    zx: torch.Tensor
    u: torch.Tensor
    u_sumsq: torch.Tensor

    @classmethod
    def allocate(cls, batch, d_model, d_ssm, n_zx, nheads, headdim, dstate, dtype, residual_dtype, device):
        p_blocks = triton.cdiv(headdim, _block_p(headdim, dstate))
        return cls(torch.zeros(batch, d_model, dtype=residual_dtype, device=device),
                   torch.zeros(batch, n_zx, dtype=dtype, device=device),
                   torch.zeros(batch, d_ssm, dtype=dtype, device=device),
                   torch.zeros(batch, nheads * p_blocks, dtype=torch.float32, device=device))


def _block_p(headdim, dstate):
    elements = state_update.STATE_TILE[0]  # (read at call time: benchmarks patch it)
    return max(1, min(triton.next_power_of_2(headdim), max(16, elements // triton.next_power_of_2(dstate))))


@dataclass
class MixerWeights:
    """One Mamba-2 block's tensors as the stages read them (a gated norm of one group, gate before the norm, no
    out_proj bias, no channels beside the SSM: Mamba2Mixer.can_fold_norm)."""

    norm_weight: torch.Tensor
    norm_eps: float
    in_weight: torch.Tensor
    in_bias: Optional[torch.Tensor]
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


def _state_programs(device, tiles: int) -> int:
    """How many programs walk a launch's state tiles: STATE_PROGRAMS_PER_SM per SM (each keeps its next tile's
    state in flight while it works on one), at most one per tile."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(tiles, STATE_PROGRAMS_PER_SM * sms))


def pipeline_stage(bufs: PipelineBuffers, nheads: int, headdim: int, dstate: int, block_m: int,
                   in_role, out_role, state_role):
    """One launch: in_role / out_role = (row0, rows, MixerWeights) run stages I / O on those rows;
    state_role = (row0, rows, MixerWeights, ssm_state (batch, nheads, headdim, dstate), conv ring (batch, conv_dim,
    width), slot (0-dim int64: the ring slot of this token)) runs stage S. A role with 0 rows has no programs (its
    tensors still set the launch's dtypes, so give a real layer's)."""
    res, zx = bufs.residual, bufs.zx
    batch, d_model = res.shape
    d_ssm = nheads * headdim
    n_zx = zx.shape[1]
    n_g_part = bufs.u_sumsq.shape[1]
    IN_N, IN_K = IN_TILE
    OUT_N, OUT_K = OUT_TILE
    i_row0, i_rows, iw = in_role
    o_row0, o_rows, ow = out_role
    s_row0, s_rows, sw, state, ring, slot = state_role
    for row0, rows in ((i_row0, i_rows), (o_row0, o_rows), (s_row0, s_rows)):
        if rows > block_m or row0 + rows > batch:
            raise ValueError(f"pipeline_stage: rows {row0}..{row0 + rows} do not fit (batch {batch}, tile {block_m})")
    if state.shape != (batch, nheads, headdim, dstate) or ring.shape[:2] != (batch, n_zx - d_ssm - nheads):
        raise ValueError(f"pipeline_stage: state {tuple(state.shape)} / ring {tuple(ring.shape)} disagree with "
                         f"the buffers (batch {batch}, {nheads} heads x {headdim} x {dstate})")
    n_in = triton.cdiv(n_zx, IN_N) if i_rows else 0
    n_out = triton.cdiv(d_model, OUT_N) if o_rows else 0
    s_tiles = s_rows * n_g_part
    n_state = _state_programs(res.device, s_tiles) if s_tiles else 0
    width = sw.conv_weight.shape[1]
    D = sw.D
    D_h, D_p = (D.stride(0), 0) if D.dim() == 1 else (D.stride(0), D.stride(1))
    dt_limit = tuple(sw.dt_limit)
    has_limit = dt_limit != (0.0, float("inf"))
    grid = (n_in + n_out + n_state,)
    _pipeline_kernel[grid](
        n_in, n_out,
        i_row0, i_rows, iw.norm_weight, iw.in_weight, iw.in_bias if iw.in_bias is not None else iw.in_weight,
        float(iw.norm_eps),
        o_row0, o_rows, ow.out_weight, float(ow.gnorm_eps),
        s_row0, s_tiles, state, ring, slot, sw.conv_weight,
        sw.conv_bias if sw.conv_bias is not None else sw.conv_weight, sw.A_log, D,
        sw.dt_bias if sw.dt_bias is not None else sw.A_log, sw.gnorm_weight, float(dt_limit[0]),
        float(min(dt_limit[1], 3.0e38)),
        res, zx, bufs.u, bufs.u_sumsq,
        d_model, n_zx, d_ssm, nheads, headdim, dstate, nheads // sw.ngroups, sw.ngroups, n_g_part,
        1.0 / d_model, 1.0 / d_ssm,
        res.stride(0), zx.stride(0), bufs.u.stride(0), bufs.u_sumsq.stride(0), iw.in_weight.stride(0),
        ow.out_weight.stride(0), *state.stride(), *ring.stride(), *sw.conv_weight.stride(), D_h, D_p,
        HAS_IN_BIAS=iw.in_bias is not None, WIDTH=width, HAS_CONV_BIAS=sw.conv_bias is not None,
        HAS_D=True, HAS_DT_BIAS=sw.dt_bias is not None, HAS_LIMIT=has_limit,
        BLOCK_M=block_m, IN_N=IN_N, IN_K=IN_K, OUT_N=OUT_N, OUT_K=OUT_K,
        BLOCK_GPART=triton.next_power_of_2(n_g_part), BLOCK_P=_block_p(headdim, dstate),
        BLOCK_N=triton.next_power_of_2(dstate), EVICT=state_update.STATE_EVICT, DOT_F32=_INTERPRET,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES, **pdl_options(early=True),
    )


@triton.jit
def _embed_kernel(tok_ptr, emb_ptr, res_ptr, d_model, emb_v, res_b, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """The residual of the first block: the token's embedding row, in the residual's dtype."""
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < d_model
    wait_and_release(USE_PDL)
    tok = tl.load(tok_ptr + b)
    tl.store(res_ptr + b * res_b + offs,
             tl.load(emb_ptr + tok * emb_v + offs, mask=m, other=0.0).to(res_ptr.dtype.element_ty), mask=m)


def embed_rows(token: torch.Tensor, embedding: torch.Tensor, bufs: PipelineBuffers):
    """bufs.residual = embedding[token], in the residual's dtype (the first I stage's input)."""
    batch, d_model = bufs.residual.shape
    _embed_kernel[(batch,)](token, embedding, bufs.residual, d_model, embedding.stride(0), bufs.residual.stride(0),
                            BLOCK=triton.next_power_of_2(d_model), num_warps=4, **pdl_options())
