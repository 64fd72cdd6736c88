"""One decoding step of a Mamba-2 mixer in Triton: the short causal conv and the SSM state update, in place.

`state_update` advances each head's state h (headdim, dstate) by one token and reads out y:

    dt = clamp(softplus(dt + dt_bias)) ;  h = exp(dt * A) * h + dt * x B^T ;  y = h C + D * x ;  y *= silu(z)

One program owns a (batch, head, block of headdim rows) tile of the state: it is read once and written once, so
the step moves the state's bytes twice and nothing else of size. `conv_step` shifts the (batch, dim, width - 1)
conv window by one input and returns the convolved (and SiLU-activated) value; each program owns its channels, so
the in-place shift has no race. Both accept strided views (the slices of in_proj's output) without copies.

The gated RMSNorm after the state update (one norm group, gate before the norm) can fold into the step
(`norm_weight=`): RMSNorm's scale is one number per row and out_proj is linear, so

    out_proj(rmsnorm(y * silu(z)) * w) = rstd_row * ((y * silu(z) * w) @ W_out^T)

The state kernel then writes u = y * silu(z) * w and each program's partial sum of (y * silu(z))^2 over its headdim
rows (float32, one slot per program: no atomics, deterministic); out_proj runs on u, and the next `add_rmsnorm`
(`hidden_rms=`) sums the partials in a fixed order and scales its hidden input by rstd before the residual add.
That saves the gated norm's launch (and its read and write of y) per layer and step.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .pdl import options as pdl_options, release_early, wait_and_release


# A program's state tile: BLOCK_P rows of headdim by all of dstate, as (elements per tile, num_warps), below batch
# 16 (few programs: smaller tiles spread them over more SMs) and from it on (bandwidth-bound). H100 (sm_90): below
# batch 16 the fastest of benchmarks/bench_decode.py --sweep. From batch 16 picked inside whole captured steps at
# batch 64 (a sweep keeps the state in L2 between calls, so it ranks tiles only roughly): 32 rows x dstate 128
# (4096) against 64 rows (8192): -3.4 % per step at mamba2-370m, ~-3 % at 130m; the state update then streams
# bf16 states at ~2.7 TB/s, ~90% of a device copy.
STATE_TILE_SMALL_BATCH = (2048, 2)
STATE_TILE = (4096, 4)
# state_update's eviction hint for the state's load and store: a layer's state is next read a whole step later,
# after every other layer's state has streamed through L2, so its lines are the ones to give up first. H100
# (sm_90) at batch 64: -0.3 to -1.5 % per step for mamba2-130m, -2.4 % for mamba2-370m against no hint ("").
STATE_EVICT = "evict_first"
# conv_step's (channels per program, num_warps)
CONV_TILE = (256, 4)


def state_block_p(p, n, elements):
    """Headdim rows per state tile of about `elements` values (all of dstate in each row)."""
    return max(1, min(triton.next_power_of_2(p), max(16, elements // triton.next_power_of_2(n))))


def _state_tiles(b, p, n, block_p=None, num_warps=None):
    elements, warps = STATE_TILE_SMALL_BATCH if b < 16 else STATE_TILE
    return triton.next_power_of_2(n), block_p or state_block_p(p, n, elements), num_warps or warps


@triton.jit
def _dt_and_decay(dt_ptr, dtb_ptr, A_ptr, b, h, dt_b, dt_h, dt_min, dt_max, HAS_DT_BIAS: tl.constexpr,
                  DT_SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, A_IS_LOG: tl.constexpr):
    """One head's step size and decay exp(dt * A), in float32: dt (+ dt_bias), softplus, clamp."""
    dt = tl.load(dt_ptr + b * dt_b + h * dt_h).to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dtb_ptr + h).to(tl.float32)
    A = tl.load(A_ptr + h).to(tl.float32)
    if A_IS_LOG:
        A = -tl.exp(A)  # the parameter A_log: saves the model two tiny launches per layer and step
    return _softplus_and_decay(dt, A, dt_min, dt_max, DT_SOFTPLUS, HAS_LIMIT)


@triton.jit
def _softplus_and_decay(dt, A, dt_min, dt_max, DT_SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """dt (with its bias) through softplus and the clamp; returns (dt, exp(A * dt))."""
    if DT_SOFTPLUS:
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)  # F.softplus with its threshold
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    return dt, tl.exp(A * dt)


@triton.jit
def _state_tile(state_ptr, b, h, p_block, headdim, dstate, heads_per_group, s_b, s_h, s_p, s_n,
                BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr, EVICT: tl.constexpr):
    """A step program's group, its headdim rows (block p_block of head h, batch row b) and dstate columns with
    their masks, and its state tile in float32. The tile is the program's own (last written by this layer's
    previous step), so it loads before the PDL wait; everything else a step kernel reads comes after it."""
    offs_p = p_block * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    s_ptrs = state_ptr + b * s_b + h * s_h + offs_p[:, None] * s_p + offs_n[None, :] * s_n
    mask = mask_p[:, None] & mask_n[None, :]
    st = tl.load(s_ptrs, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
    wait_and_release(USE_PDL)
    return h // heads_per_group, offs_p, offs_n, mask_p, mask_n, s_ptrs, mask, st


@triton.jit
def _gate_and_store(y, z, out_ptr, o_off, nw_ptr, ss_ptr, ss_slot, h, headdim, offs_p, mask_p,
                    HAS_Z: tl.constexpr, FOLD_NORM: tl.constexpr):
    """The step's output: y (this program's headdim rows, float32) gated by silu(z) and stored. FOLD_NORM: also
    the partial sum of squares of the gated rows into slot ss_slot (ss_ptr, already at this batch row; one slot
    per program along the row, in the order of heads, then headdim blocks), and the norm's weight applied to the
    stored value."""
    if HAS_Z:
        y *= z * tl.sigmoid(z)
    if FOLD_NORM:
        y = tl.where(mask_p, y, 0.0)
        tl.store(ss_ptr + ss_slot, tl.sum(y * y, axis=0))
        y *= tl.load(nw_ptr + h * headdim + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    tl.store(out_ptr + o_off, y.to(out_ptr.dtype.element_ty), mask=mask_p)


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr, out_ptr, nw_ptr, ss_ptr,
    nheads, headdim, dstate, heads_per_group, dt_min, dt_max,
    s_b, s_h, s_p, s_n, x_b, x_h, x_p, dt_b, dt_h, B_b, B_g, B_n, C_b, C_g, C_n, D_h, D_p, z_b, z_h, z_p,
    o_b, o_h, o_p, ss_b,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    HAS_LIMIT: tl.constexpr, A_IS_LOG: tl.constexpr, FOLD_NORM: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr, EVICT: tl.constexpr,
):
    b = tl.program_id(1) // nheads
    h = tl.program_id(1) % nheads
    state_tile_update(b, h, tl.program_id(0), h * tl.num_programs(0) + tl.program_id(0), state_ptr, x_ptr, dt_ptr,
                      A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr, out_ptr, nw_ptr, ss_ptr, headdim, dstate,
                      heads_per_group, dt_min, dt_max, s_b, s_h, s_p, s_n, x_b, x_h, x_p, dt_b, dt_h, B_b, B_g, B_n,
                      C_b, C_g, C_n, D_h, D_p, z_b, z_h, z_p, o_b, o_h, o_p, ss_b, HAS_D, HAS_Z, HAS_DT_BIAS,
                      DT_SOFTPLUS, HAS_LIMIT, A_IS_LOG, FOLD_NORM, BLOCK_P, BLOCK_N, USE_PDL, EVICT)


@triton.jit
def state_tile_update(
    b, h, p_block, ss_slot, state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr, out_ptr, nw_ptr,
    ss_ptr, headdim, dstate, heads_per_group, dt_min, dt_max,
    s_b, s_h, s_p, s_n, x_b, x_h, x_p, dt_b, dt_h, B_b, B_g, B_n, C_b, C_g, C_n, D_h, D_p, z_b, z_h, z_p,
    o_b, o_h, o_p, ss_b,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    HAS_LIMIT: tl.constexpr, A_IS_LOG: tl.constexpr, FOLD_NORM: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr, EVICT: tl.constexpr,
):
    """One program of state_update: batch row b, head h, headdim block p_block (its folded-norm partial into slot
    ss_slot of the row). Loads its state tile, waits on the previous kernel (PDL), and does the rest."""
    g, offs_p, offs_n, mask_p, mask_n, s_ptrs, mask, s = _state_tile(
        state_ptr, b, h, p_block, headdim, dstate, heads_per_group, s_b, s_h, s_p, s_n, BLOCK_P, BLOCK_N, USE_PDL,
        EVICT)

    dt, decay = _dt_and_decay(dt_ptr, dtb_ptr, A_ptr, b, h, dt_b, dt_h, dt_min, dt_max, HAS_DT_BIAS, DT_SOFTPLUS,
                              HAS_LIMIT, A_IS_LOG)

    x = tl.load(x_ptr + b * x_b + h * x_h + offs_p * x_p, mask=mask_p, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * B_b + g * B_g + offs_n * B_n, mask=mask_n, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * C_b + g * C_g + offs_n * C_n, mask=mask_n, other=0.0).to(tl.float32)
    s = s * decay + (x * dt)[:, None] * Bv[None, :]
    tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=mask, eviction_policy=EVICT)

    y = tl.sum(s * Cv[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + h * D_h + offs_p * D_p, mask=mask_p, other=0.0).to(tl.float32)
    z = y
    if HAS_Z:
        z = tl.load(z_ptr + b * z_b + h * z_h + offs_p * z_p, mask=mask_p, other=0.0).to(tl.float32)
    _gate_and_store(y, z, out_ptr, b * o_b + h * o_h + offs_p * o_p, nw_ptr, ss_ptr + b * ss_b, ss_slot, h, headdim,
                    offs_p, mask_p, HAS_Z, FOLD_NORM)


def _fold_buffers(norm_weight, b, h, p, programs_per_head, device):
    """The folded gated norm's weight check and its partial sums (batch, programs per row), float32."""
    if norm_weight is None:
        return None
    assert norm_weight.shape == (h * p,) and norm_weight.is_contiguous(), \
        f"norm_weight: expected a contiguous ({h * p},) weight, got {tuple(norm_weight.shape)}"
    return torch.empty(b, h * programs_per_head, device=device, dtype=torch.float32)


def state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                 dt_limit=(0.0, math.inf), out=None, A_is_log=False, norm_weight=None, block_p=None,
                 num_warps=None):
    """state: (batch, nheads, headdim, dstate), updated in place; x, z: (batch, nheads, headdim); dt: (batch,
    nheads); A, dt_bias: (nheads,); B, C: (batch, ngroups, dstate); D: (nheads,) or (nheads, headdim).
    A_is_log: A holds A_log, and A = -exp(A_log) is taken in the kernel.
    Returns y (batch, nheads, headdim) in x's dtype (or written into `out`).
    norm_weight (nheads * headdim,): the gated RMSNorm (one group) folded in (see the module docstring): returns
    (u, sumsq) with u = y * silu(z) * norm_weight in x's dtype and sumsq (batch, programs per row) float32 partial
    sums of (y * silu(z))^2, which add up to the row's sum over all nheads * headdim channels."""
    b, h, p, n = state.shape
    g = B.shape[1]
    assert x.shape == (b, h, p) and dt.shape == (b, h) and A.shape == (h,), "state_update: shapes disagree"
    assert B.shape == (b, g, n) and C.shape == (b, g, n) and h % g == 0, "state_update: B/C shapes disagree"
    if out is None:
        out = torch.empty(b, h, p, device=x.device, dtype=x.dtype)
    BLOCK_N, BLOCK_P, num_warps = _state_tiles(b, p, n, block_p, num_warps)
    sumsq = _fold_buffers(norm_weight, b, h, p, triton.cdiv(p, BLOCK_P), x.device)
    if D is not None:
        D_h, D_p = (D.stride(0), 0) if D.dim() == 1 else (D.stride(0), D.stride(1))
    else:
        D_h = D_p = 0
    zs = z.stride() if z is not None else (0, 0, 0)
    has_limit = tuple(dt_limit) != (0.0, math.inf)
    grid = (triton.cdiv(p, BLOCK_P), b * h)
    _state_update_kernel[grid](
        state, x, dt, A, B, C, D if D is not None else A, z if z is not None else x,
        dt_bias if dt_bias is not None else A, out, norm_weight if sumsq is not None else A,
        sumsq if sumsq is not None else A,
        h, p, n, h // g, float(dt_limit[0]), float(min(dt_limit[1], 3.0e38)),
        *state.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(), D_h, D_p, *zs, *out.stride(),
        sumsq.stride(0) if sumsq is not None else 0,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
        HAS_LIMIT=has_limit, A_IS_LOG=A_is_log, FOLD_NORM=sumsq is not None, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
        num_warps=num_warps, EVICT=STATE_EVICT, **pdl_options(),
    )
    return out if sumsq is None else (out, sumsq)


@triton.jit
def _conv_step_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, out_ptr, dim,
    x_b, x_c, s_b, s_c, s_w, w_c, w_w, o_b, o_c,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_C: tl.constexpr, USE_PDL: tl.constexpr,
):
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = offs < dim
    wait_and_release(USE_PDL)
    x = tl.load(x_ptr + b * x_b + offs * x_c, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc = tl.load(bias_ptr + offs, mask=m, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    s_base = state_ptr + b * s_b + offs * s_c
    for k in tl.static_range(WIDTH - 1):
        prev = tl.load(s_base + k * s_w, mask=m, other=0.0)
        acc += prev.to(tl.float32) * tl.load(w_ptr + offs * w_c + k * w_w, mask=m, other=0.0).to(tl.float32)
        if k > 0:
            tl.store(s_base + (k - 1) * s_w, prev, mask=m)  # slot k-1 was already read
    acc += x * tl.load(w_ptr + offs * w_c + (WIDTH - 1) * w_w, mask=m, other=0.0).to(tl.float32)
    tl.store(s_base + (WIDTH - 2) * s_w, x.to(state_ptr.dtype.element_ty), mask=m)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_ptr + b * o_b + offs * o_c, acc.to(out_ptr.dtype.element_ty), mask=m)


def conv_step(x, conv_state, weight, bias=None, activation="silu", out=None):
    """x: (batch, dim), the new input; conv_state: (batch, dim, width - 1), oldest first, shifted in place;
    weight: (dim, width). Returns the conv output (batch, dim) in x's dtype."""
    b, d = x.shape
    w = weight.shape[1]
    assert conv_state.shape == (b, d, w - 1) and w >= 2, "conv_step: shapes disagree"
    if out is None:
        out = torch.empty_like(x)
    BLOCK_C, num_warps = CONV_TILE
    grid = (triton.cdiv(d, BLOCK_C), b)
    _conv_step_kernel[grid](
        x, conv_state, weight, bias if bias is not None else weight, out, d,
        *x.stride(), *conv_state.stride(), *weight.stride(), *out.stride(),
        WIDTH=w, HAS_BIAS=bias is not None, SILU=activation == "silu", BLOCK_C=BLOCK_C, num_warps=num_warps,
        **pdl_options(),
    )
    return out


@triton.jit
def _add_rmsnorm_kernel(h_ptr, r_ptr, w_ptr, r_out_ptr, out_ptr, ss_ptr, dim, eps, n_part, inv_h_dim, h_eps,
                        h_b, r_b, ro_b, o_b, ss_b, HAS_RESIDUAL: tl.constexpr, HAS_RMS: tl.constexpr,
                        BLOCK: tl.constexpr, BLOCK_PART: tl.constexpr, USE_PDL: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < dim
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    wait_and_release(USE_PDL)
    x = tl.load(h_ptr + b * h_b + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_RMS:  # the folded gated norm's scale: the state kernel's partials summed in a fixed order
        po = tl.arange(0, BLOCK_PART)
        part = tl.load(ss_ptr + b * ss_b + po, mask=po < n_part, other=0.0)
        x = x * (1.0 / tl.sqrt(tl.sum(part, axis=0) * inv_h_dim + h_eps))
    if HAS_RESIDUAL:
        x += tl.load(r_ptr + b * r_b + offs, mask=m, other=0.0).to(tl.float32)
    x = x.to(r_out_ptr.dtype.element_ty)
    tl.store(r_out_ptr + b * ro_b + offs, x, mask=m)
    # the block normalises the residual as rounded to the weight's dtype (as Block.forward does)
    x = x.to(w_ptr.dtype.element_ty).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
    tl.store(out_ptr + b * o_b + offs, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=m)


def add_rmsnorm(hidden, residual, weight, eps, residual_dtype, hidden_rms=None):
    """A pre-norm block's entry for one token per row: residual' = residual + hidden (or hidden when residual is
    None) kept in residual_dtype, and RMSNorm(residual') in weight's dtype. hidden: (batch, dim).
    hidden_rms = (sumsq, n, eps): hidden is a folded gated norm's raw output (state_update(norm_weight=)), to be
    multiplied by rsqrt(sumsq.sum(-1) / n + eps) first; sumsq (batch, partials) float32.
    Returns (normed, residual')."""
    b, d = hidden.shape
    r_out = torch.empty(b, d, device=hidden.device, dtype=residual_dtype)
    out = torch.empty(b, d, device=hidden.device, dtype=weight.dtype)
    r = residual if residual is not None else hidden
    sumsq, n, h_eps = hidden_rms if hidden_rms is not None else (weight, 1, 0.0)
    if hidden_rms is not None:
        assert sumsq.dtype == torch.float32 and sumsq.shape[0] == b and sumsq.stride(-1) == 1, \
            f"add_rmsnorm: sumsq must be (batch={b}, partials) float32 rows, got {sumsq.dtype} {tuple(sumsq.shape)}"
    n_part = sumsq.shape[-1] if hidden_rms is not None else 1
    _add_rmsnorm_kernel[(b,)](hidden, r, weight, r_out, out, sumsq, d, float(eps), n_part, 1.0 / n, float(h_eps),
                              hidden.stride(0), r.stride(0), r_out.stride(0), out.stride(0),
                              sumsq.stride(0) if hidden_rms is not None else 0,
                              HAS_RESIDUAL=residual is not None, HAS_RMS=hidden_rms is not None,
                              BLOCK=triton.next_power_of_2(d), BLOCK_PART=triton.next_power_of_2(n_part),
                              num_warps=4 if d <= 2048 else 8, **pdl_options())
    return out, r_out


@triton.jit
def _mixer_step_kernel(
    state_ptr, ring_ptr, slot_ptr, xbc_ptr, cw_ptr, cb_ptr, dt_ptr, A_log_ptr, D_ptr, z_ptr, dtb_ptr, out_ptr,
    nw_ptr, ss_ptr, nheads, headdim, dstate, heads_per_group, d_ssm, ngroups, dt_min, dt_max,
    s_b, s_h, s_p, s_n, r_b, r_c, r_w, xbc_b, xbc_c, cw_c, cw_w, dt_b, dt_h, D_h, D_p, z_b, z_h, z_p, o_b, o_h, o_p,
    ss_b,
    WIDTH: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr, FOLD_NORM: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr,
):
    release_early(USE_PDL)
    # Before the PDL wait: the state tile, the parameters, and the ring's older inputs with their taps. None of
    # them is written by a kernel of this step: the ring's older slots and the slot index (advanced after the
    # step) were last written before it. After the wait: this token's x, B, C, dt and z (in_proj's outputs).
    b = tl.program_id(1) // nheads
    h = tl.program_id(1) % nheads
    g, offs_p, offs_n, mask_p, mask_n, s_ptrs, mask, st = _state_tile(
        state_ptr, b, h, tl.program_id(0), headdim, dstate, heads_per_group, s_b, s_h, s_p, s_n, BLOCK_P, BLOCK_N,
        False, "")
    slot = tl.load(slot_ptr)  # the ring slot of this token's input; the older inputs sit in the slots before it

    # Causal conv (+ SiLU) of this head's x channels and its group's B and C channels. The ring holds WIDTH
    # inputs; this token's overwrites the oldest, which no program reads any more, so programs that share B and C
    # (every head of a group) never race: each reads only the other slots.
    cx = h * headdim + offs_p
    cB = d_ssm + g * dstate + offs_n
    cC = d_ssm + ngroups * dstate + g * dstate + offs_n
    x = tl.zeros([BLOCK_P], dtype=tl.float32)
    Bv = tl.zeros([BLOCK_N], dtype=tl.float32)
    Cv = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_CONV_BIAS:
        x += tl.load(cb_ptr + cx, mask=mask_p, other=0.0).to(tl.float32)
        Bv += tl.load(cb_ptr + cB, mask=mask_n, other=0.0).to(tl.float32)
        Cv += tl.load(cb_ptr + cC, mask=mask_n, other=0.0).to(tl.float32)
    ring = ring_ptr + b * r_b
    for k in tl.static_range(WIDTH - 1):
        s = (slot + (k + 1)) % WIDTH  # oldest first: slot+1 is the oldest kept input
        x += tl.load(ring + cx * r_c + s * r_w, mask=mask_p, other=0.0).to(tl.float32) * \
            tl.load(cw_ptr + cx * cw_c + k * cw_w, mask=mask_p, other=0.0).to(tl.float32)
        Bv += tl.load(ring + cB * r_c + s * r_w, mask=mask_n, other=0.0).to(tl.float32) * \
            tl.load(cw_ptr + cB * cw_c + k * cw_w, mask=mask_n, other=0.0).to(tl.float32)
        Cv += tl.load(ring + cC * r_c + s * r_w, mask=mask_n, other=0.0).to(tl.float32) * \
            tl.load(cw_ptr + cC * cw_c + k * cw_w, mask=mask_n, other=0.0).to(tl.float32)
    wx = tl.load(cw_ptr + cx * cw_c + (WIDTH - 1) * cw_w, mask=mask_p, other=0.0).to(tl.float32)
    wB = tl.load(cw_ptr + cB * cw_c + (WIDTH - 1) * cw_w, mask=mask_n, other=0.0).to(tl.float32)
    wC = tl.load(cw_ptr + cC * cw_c + (WIDTH - 1) * cw_w, mask=mask_n, other=0.0).to(tl.float32)
    A = -tl.exp(tl.load(A_log_ptr + h).to(tl.float32))
    if HAS_DT_BIAS:
        dt_bias = tl.load(dtb_ptr + h).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + h * D_h + offs_p * D_p, mask=mask_p, other=0.0).to(tl.float32)
    wait_and_release(USE_PDL)

    x_new = tl.load(xbc_ptr + b * xbc_b + cx * xbc_c, mask=mask_p, other=0.0)
    B_new = tl.load(xbc_ptr + b * xbc_b + cB * xbc_c, mask=mask_n, other=0.0)
    C_new = tl.load(xbc_ptr + b * xbc_b + cC * xbc_c, mask=mask_n, other=0.0)
    dt = tl.load(dt_ptr + b * dt_b + h * dt_h).to(tl.float32)
    z = x
    if HAS_Z:
        z = tl.load(z_ptr + b * z_b + h * z_h + offs_p * z_p, mask=mask_p, other=0.0).to(tl.float32)
    x = x + x_new.to(tl.float32) * wx
    Bv = Bv + B_new.to(tl.float32) * wB
    Cv = Cv + C_new.to(tl.float32) * wC
    x = x * tl.sigmoid(x)
    Bv = Bv * tl.sigmoid(Bv)
    Cv = Cv * tl.sigmoid(Cv)
    # the conv output is rounded to the activations' dtype, as the unfused path stores it
    x = x.to(x_new.dtype).to(tl.float32)
    Bv = tl.where(mask_n, Bv.to(B_new.dtype).to(tl.float32), 0.0)
    Cv = tl.where(mask_n, Cv.to(C_new.dtype).to(tl.float32), 0.0)
    slot_slot = slot % WIDTH
    tl.store(ring + cx * r_c + slot_slot * r_w, x_new.to(ring_ptr.dtype.element_ty), mask=mask_p)
    if (h % heads_per_group == 0) and (tl.program_id(0) == 0):  # one program per group writes B and C
        tl.store(ring + cB * r_c + slot_slot * r_w, B_new.to(ring_ptr.dtype.element_ty), mask=mask_n)
        tl.store(ring + cC * r_c + slot_slot * r_w, C_new.to(ring_ptr.dtype.element_ty), mask=mask_n)

    # the SSM state update, as in _state_update_kernel
    if HAS_DT_BIAS:
        dt += dt_bias
    dt, decay = _softplus_and_decay(dt, A, dt_min, dt_max, True, HAS_LIMIT)
    st = st * decay + (x * dt)[:, None] * Bv[None, :]
    tl.store(s_ptrs, st.to(state_ptr.dtype.element_ty), mask=mask)
    y = tl.sum(st * Cv[None, :], axis=1)
    if HAS_D:
        y += x * Dv
    _gate_and_store(y, z, out_ptr, b * o_b + h * o_h + offs_p * o_p, nw_ptr, ss_ptr + b * ss_b,
                    h * tl.num_programs(0) + tl.program_id(0), h, headdim, offs_p, mask_p, HAS_Z, FOLD_NORM)


def mixer_step(state, conv_ring, slot, xBC, conv_weight, conv_bias, dt, A_log, D=None, z=None, dt_bias=None,
               dt_limit=(0.0, math.inf), ngroups=1, norm_weight=None, block_p=None, num_warps=None):
    """A Mamba-2 mixer's conv (+ SiLU) and SSM state update for one token, in one launch.

    state: (batch, nheads, headdim, dstate), in place; conv_ring: (batch, conv_dim, width), the last `width`
    conv inputs as a ring, slot (0-dim int64 tensor) the one this token's input overwrites (its older inputs sit in
    slots slot+1, ..., slot+width-1, mod width), updated in place for x, B and C; xBC: (batch, conv_dim) with
    conv_dim = d_ssm + 2 * ngroups * dstate; dt: (batch, nheads); A_log, dt_bias: (nheads,); D: (nheads,) or
    (nheads, headdim); z: (batch, nheads, headdim) or None. dt goes through softplus. Returns y (batch, nheads,
    headdim) in xBC's dtype; with norm_weight, (u, sumsq) as state_update(norm_weight=) returns them."""
    b, h, p, n = state.shape
    width = conv_ring.shape[-1]
    d_ssm = h * p
    assert xBC.shape == (b, d_ssm + 2 * ngroups * n) and conv_ring.shape == (b, xBC.shape[1], width), \
        "mixer_step: xBC / conv_ring shapes disagree with the state"
    out = torch.empty(b, h, p, device=xBC.device, dtype=xBC.dtype)
    if D is not None:
        D_h, D_p = (D.stride(0), 0) if D.dim() == 1 else (D.stride(0), D.stride(1))
    else:
        D_h = D_p = 0
    zs = z.stride() if z is not None else (0, 0, 0)
    BLOCK_N, BLOCK_P, num_warps = _state_tiles(b, p, n, block_p, num_warps)
    sumsq = _fold_buffers(norm_weight, b, h, p, triton.cdiv(p, BLOCK_P), xBC.device)
    grid = (triton.cdiv(p, BLOCK_P), b * h)
    _mixer_step_kernel[grid](
        state, conv_ring, slot, xBC, conv_weight, conv_bias if conv_bias is not None else conv_weight, dt, A_log,
        D if D is not None else A_log, z if z is not None else xBC, dt_bias if dt_bias is not None else A_log, out,
        norm_weight if sumsq is not None else A_log, sumsq if sumsq is not None else A_log,
        h, p, n, h // ngroups, d_ssm, ngroups, float(dt_limit[0]), float(min(dt_limit[1], 3.0e38)),
        *state.stride(), *conv_ring.stride(), *xBC.stride(), *conv_weight.stride(), *dt.stride(), D_h, D_p, *zs,
        *out.stride(), sumsq.stride(0) if sumsq is not None else 0,
        WIDTH=width, HAS_CONV_BIAS=conv_bias is not None, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_DT_BIAS=dt_bias is not None, HAS_LIMIT=tuple(dt_limit) != (0.0, math.inf), FOLD_NORM=sumsq is not None,
        BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, num_warps=num_warps, **pdl_options(early=True),
    )
    return out if sumsq is None else (out, sumsq)
