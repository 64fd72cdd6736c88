"""Chunked SSD (Mamba-2's state space dual) in Triton, forward and backward, as a torch.library custom op.

Per head, positions are cut into chunks of `chunk_size` (at most CONFIG max_chunk: a longer chunk gives the same function
with more state steps); inside a chunk the output is the masked quadratic form,
across chunks a (headdim, dstate) state is carried. With cum_t the in-chunk cumulative sum of dt·A:

    y_t = Σ_{s≤t, same doc} (C_t·B_s) exp(cum_t - cum_s) dt_s x_s + e_t h_in C_t + D x_t,  e_t = exp(cum_t)·reach_t
    h_out = h_in · exp(cum_last)·carry + Σ_s w_s dt_s x_s B_s^T ,  w_s = exp(cum_last - cum_s)·in_last_s

Forward (`ssd_fwd`):
  1. `_dt_kernel`: dt + dt_bias, softplus, clamp, and the in-chunk cumsum of dt·A, per (batch, head, chunk).
  2. `_fwd_state_kernel`: one program per (batch, head, headdim block, dstate block) walks the chunks in order:
     each chunk's state contribution (tl.dot over blocks of 64 positions) and the state passing in one pass, so
     chunk states never go through memory; it stores the state entering each chunk (x's dtype: it is a dot
     operand next) and the final state (fp32). Headdim blocks shrink when batch × heads alone cannot fill the GPU.
     A two-level pass (CONFIG state_seg_programs) for long sequences at small batch: segments of chunks walked in
     parallel (the first from the initial state, the others from zero), `_fwd_seg_kernel` chains the segments by
     one scan, `_fwd_fix_kernel` adds each segment's true entering state, decayed, to its chunks' entering states.
  3. `_cb_kernel` (>= 4 heads per group): C·B^T per chunk once per group (fp32 sums; stored in bf16 for bf16),
     only the blocks on and below the diagonal (the backward computes its own, whole, at dstate >= 128).
  4. `_fwd_out_kernel`: one program per (head, block of 64 positions, batch), heads fastest so a group's heads
     share B and C in L2: one accumulator takes the entering state's term and (CONFIG out_fold_decay) the
     off-diagonal source blocks with the decay folded into the operands, is scaled by the row factor once, then
     takes the masked blocks; D and the z gate. 64 x 64 tiles and a register cap of 128 fit 4 programs per SM.
Backward (`ssd_bwd`), deterministic (no atomics; sums across programs go through buffers reduced in fixed order):
  1. `_bwd_state_kernel`: the reverse state pass: gradient of each chunk's exiting state, of the initial state,
     and the decay's share of d cum_last. When batch × heads cannot fill the GPU (32K-64K tokens per row at small
     batch) it runs two-level, as the forward: segments of chunks walked in parallel from zero, `_bwd_seg_kernel`
     chains the segments by one scan, `_bwd_fix_kernel` adds each segment's exiting gradient, decayed, to its
     chunks' gradients and d cum_last partials (dy and C read once).
  2. `_bwd_dcb_kernel`: per (group, causal tile pair (t block, s block) of a chunk), looping over the group's
     heads: dCB[t, s] = Σ_h (dy_t·x_s) L_ts dt_s summed in registers (bf16 out), and each head's quadratic d cum
     (t side and s side) into per-tile slots; it also stores its C·B tile transposed for dx (CONFIG bwd_cbt).
  3. `_bwd_dx_kernel` per (head, source block s), heads fastest when a C·B^T tile would not stay in L2 between
     heads: dx (one dot per tile), the direct part of ddt, the state's share of d cum, dD partials.
  4. `_bwd_bc_kernel` twice, per (group, block): dC (state term head by head, with its d cum; then Σ_s dCB B_s once
     for all heads) and dB (state term head by head; then Σ_t dCB^T C_t).
  5. `_bwd_dt_kernel`: per (batch, head, chunk): the d cum parts summed in fixed order, their reverse in-chunk
     cumsum, then the chain through clamp, softplus and bias to d dt, with dA and d dt_bias partials.
The decay exp(cum_t - cum_s) inside a tile is a row factor times a column factor about a position between the two
blocks (`_decay_tile`), two exps per row and column instead of one per element; on off-diagonal blocks without
documents the two factors can instead scale the operands and the sum (CONFIG fold_decay). Elementwise work and
register pressure, not tensor-core throughput or bandwidth, bound these kernels today (notes/ssd_kernels.md).
"""

import contextlib
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .partial_sums import sum_partials

Tensor = torch.Tensor
INF = math.inf
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


# ---------------------------------------------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _softplus(v):
    # log1p(exp(v)) written as max(v, 0) + log1p(exp(-|v|)), with log1p accurate for small arguments; torch's
    # threshold (v > 20 -> v) kept so both sides agree exactly there
    u = tl.exp(-tl.abs(v))
    w = 1.0 + u
    l1p = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
    return tl.where(v > 20.0, v, tl.maximum(v, 0.0) + l1p)


@triton.jit
def _load_dt(dt_ptr, dtb_ptr, b, t, hh, L, H, lo, hi,
             HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr):
    valid = t < L
    v = tl.load(dt_ptr + (b * L + t) * H + hh, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(dtb_ptr + hh).to(tl.float32)
    if SOFTPLUS:
        v = _softplus(v)
    if HAS_LIMIT:
        v = tl.minimum(tl.maximum(v, lo), hi)
    return tl.where(valid, v, 0.0)  # padding: dt = 0, no decay and no input


@triton.jit
def _decay_tile(row, col, cum_a, cum_b, causal, diag, span):
    """exp(cum_t - cum_s) over a (rows, cols) tile, 0 where not causal, as a row factor times a column factor
    taken about a reference position between the blocks (both factors <= 1 off the diagonal block): two exps per
    row/column instead of one per element. On the diagonal block one factor can grow up to exp(span), so a block
    that decays by more than e^60 takes the exp of differences instead (cum_a - cum_b, one per element)."""
    d = row[:, None] * col[None, :]
    if diag:
        if span > 60.0:
            d = tl.exp(tl.where(causal, cum_a - cum_b, -float("inf")))
        else:
            d = tl.where(causal, d, 0.0)
    return d


@triton.jit
def _dx_cbt(cb_ptr, C_ptr, B_s, cbase, b, c, g, s, t, L, G, N, offs_n, mn,
            CS: tl.constexpr, USE_CB: tl.constexpr, CB_T: tl.constexpr, DOT_PREC: tl.constexpr, DT: tl.constexpr):
    """(C_t·B_s)^T as an (s, t) tile of chunk c: the transposed copy `_bwd_dcb_kernel` stores (CB_T, input dtype),
    the precomputed float32 C·B through a coalesced (t, s) load transposed in registers (USE_CB), or recomputed."""
    sl = s - c * CS
    tl_ = t - c * CS
    if CB_T:
        cbT = tl.load(cb_ptr + cbase + sl[:, None] * CS + tl_[None, :])
    elif USE_CB:
        cbT = tl.trans(tl.load(cb_ptr + cbase + tl_[:, None] * CS + sl[None, :]))
    else:
        C_t = tl.load(C_ptr + ((b * L + t[:, None]) * G + g) * N + offs_n[None, :],
                      mask=(t < L)[:, None] & mn[None, :], other=0.0).to(DT)
        cbT = tl.dot(B_s, tl.trans(C_t), input_precision=DOT_PREC)
    return cbT


@triton.jit
def _doc(seq_ptr, b, t, L):
    # padding positions belong to the row's last document
    return tl.load(seq_ptr + b * L + tl.minimum(t, L - 1))


@triton.jit
def _batch_head(pid_bh, H, G):
    """(batch (int64 for the offsets), head, group) of a program id that runs over batch × heads, heads fastest;
    over batch × groups with H = G it gives (batch, group, group)."""
    hh = pid_bh % H
    return (pid_bh // H).to(tl.int64), hh, hh // (H // G)


@triton.jit
def _group_program(H, G, NC, CS: tl.constexpr):
    """A per-group backward program (grid: (blocks, batch × groups)): its block index, batch row, group, heads per
    group and padded length."""
    pid = tl.program_id(0)
    b, g, _ = _batch_head(tl.program_id(1), G, G)
    return pid, b, g, H // G, NC * CS


@triton.jit
def _position_block(pid_m, L, CS: tl.constexpr, BM: tl.constexpr):
    """Chunk, offset in the chunk, positions and their in-sequence mask of the BM-position block pid_m."""
    NM: tl.constexpr = CS // BM
    c = pid_m // NM
    r0 = (pid_m % NM) * BM
    t = c * CS + r0 + tl.arange(0, BM)
    return c, r0, t, t < L


# ---------------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _dt_kernel(dt_ptr, A_ptr, dtb_ptr, dtp_ptr, cum_ptr, L, H, NC, lo, hi,
               CS: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """Processed dt and its in-chunk cumsum (times A), per (batch, head, chunk), for every later kernel to read."""
    c = tl.program_id(0)
    b, hh, _ = _batch_head(tl.program_id(1), H, 1)
    t = c * CS + tl.arange(0, CS)
    dt = _load_dt(dt_ptr, dtb_ptr, b, t, hh, L, H, lo, hi, HAS_BIAS, SOFTPLUS, HAS_LIMIT)
    cum = tl.cumsum(dt * tl.load(A_ptr + hh).to(tl.float32), 0)
    tl.store(dtp_ptr + (b * H + hh) * NC * CS + t, dt)
    tl.store(cum_ptr + (b * H + hh) * NC * CS + t, cum)


@triton.jit
def _cb_kernel(B_ptr, C_ptr, cb_ptr, L, G, N, NC,
               CS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DOT_PREC: tl.constexpr, DT: tl.constexpr,
               CAUSAL: tl.constexpr = False):
    """C_t·B_s for every (t, s) block of every chunk, once per group (float32 sums, stored in cb's dtype): the heads
    of a group share it. CAUSAL: only the blocks with j <= i (the rest of the tensor is left unwritten)."""
    c = tl.program_id(0)
    pid_ij = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b, g, _ = _batch_head(pid_bg, G, G)
    NM: tl.constexpr = CS // BM
    if CAUSAL:  # pid_ij = i (i + 1) / 2 + j
        i = pid_ij * 0
        for q in tl.static_range(1, NM):
            i += (pid_ij >= q * (q + 1) // 2).to(tl.int32)
        j = pid_ij - i * (i + 1) // 2
    else:
        i = pid_ij // NM
        j = pid_ij % NM
    t = c * CS + i * BM + tl.arange(0, BM)
    s = c * CS + j * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    mn = offs_n < N
    C_t = tl.load(C_ptr + ((b * L + t[:, None]) * G + g) * N + offs_n[None, :],
                  mask=(t[:, None] < L) & mn[None, :], other=0.0).to(DT)
    B_s = tl.load(B_ptr + ((b * L + s[:, None]) * G + g) * N + offs_n[None, :],
                  mask=(s[:, None] < L) & mn[None, :], other=0.0).to(DT)
    cb = tl.dot(C_t, tl.trans(B_s), input_precision=DOT_PREC)
    tl.store(cb_ptr + ((b * NC + c) * G + g) * CS * CS + (i * BM + tl.arange(0, BM))[:, None] * CS
             + (j * BM + tl.arange(0, BM))[None, :], cb)


@triton.jit
def _pn_block(pid_pn, NNB, P, N, BP: tl.constexpr, BN: tl.constexpr):
    """Block pid_pn of a (P, N) state in (BP, BN) blocks, NNB per row of blocks: its rows and columns, their masks,
    the block's mask and its offsets in the state."""
    offs_p = (pid_pn // NNB) * BP + tl.arange(0, BP)
    offs_n = (pid_pn % NNB) * BN + tl.arange(0, BN)
    mp = offs_p < P
    mn = offs_n < N
    return offs_p, offs_n, mp, mn, mp[:, None] & mn[None, :], offs_p[:, None] * N + offs_n[None, :]


@triton.jit
def _store_walk_end(seg_ptr, segdec_ptr, end_ptr, b, hh, H, seg, NSEG, P, N, pn, mpn, pid_pn, value, decay,
                    TWO_LEVEL: tl.constexpr):
    """What a state walk leaves: TWO_LEVEL, its segment's value and decay for the segment scan, in (batch, head,
    segment) order (the scan reads a (batch, head)'s segments as one block); one walk, the end value itself (the
    final state forward, the initial state's gradient backward)."""
    if TWO_LEVEL:
        tl.store(seg_ptr + ((b * H + hh) * NSEG + seg) * P * N + pn, value, mask=mpn)
        if pid_pn == 0:
            tl.store(segdec_ptr + (b * H + hh) * NSEG + seg, decay)
    else:
        tl.store(end_ptr + (b * H + hh) * P * N + pn, value, mask=mpn)


@triton.jit
def _chunk_outer(acc, a_ptr, v_ptr, seq_ptr, cum_ptr, dtp_ptr, b, hh, g, c, L, H, G, P, N, Lp, offs_p, offs_n, mp, mn,
                 cum_last, doc_ref, CS: tl.constexpr, BK: tl.constexpr, TO_END: tl.constexpr, HAS_SEQ: tl.constexpr,
                 DOT_PREC: tl.constexpr, DT: tl.constexpr):
    """The state walks' chunk term: acc + Σ_t w_t a_tᵀ v_t over chunk c's positions t, BK per dot, with a the
    head's (t, P) rows at offs_p and v the group's (t, N) rows at offs_n. TO_END (forward: a = x, v = B, the
    chunk's share of the state leaving it): w_t = exp(cum_last - cum_t) dt_t; else (backward: a = dy, v = C, the
    outputs' share of the gradient of the state entering it): w_t = exp(cum_t). HAS_SEQ: w_t = 0 outside document
    doc_ref."""
    for k in tl.static_range(CS // BK):
        t = c * CS + k * BK + tl.arange(0, BK)
        valid = t < L
        if TO_END:
            w = tl.exp(cum_last - tl.load(cum_ptr + (b * H + hh) * Lp + t)) * tl.load(dtp_ptr + (b * H + hh) * Lp + t)
        else:
            w = tl.exp(tl.load(cum_ptr + (b * H + hh) * Lp + t))
        if HAS_SEQ:
            w = tl.where(_doc(seq_ptr, b, t, L) == doc_ref, w, 0.0)
        a = tl.load(a_ptr + ((b * L + t[:, None]) * H + hh) * P + offs_p[None, :],
                    mask=valid[:, None] & mp[None, :], other=0.0)
        v = tl.load(v_ptr + ((b * L + t[:, None]) * G + g) * N + offs_n[None, :],
                    mask=valid[:, None] & mn[None, :], other=0.0).to(DT)
        acc += tl.dot(tl.trans((a * w[:, None]).to(DT)), v, input_precision=DOT_PREC)
    return acc


@triton.jit
def _fwd_state_kernel(x_ptr, B_ptr, init_ptr, seq_ptr, dtp_ptr, cum_ptr, states_ptr, final_ptr, seg_ptr, segdec_ptr,
                      tot_ptr, L, H, G, P, N, NC, NNB, SEGC,
                      CS: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                      HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, TWO_LEVEL: tl.constexpr, DOT_PREC: tl.constexpr,
                      DT: tl.constexpr):
    """Walks chunks [seg·SEGC, (seg+1)·SEGC) of one (batch, head, headdim block, dstate block) in order, storing the
    state entering each chunk (x's dtype: it is a dot operand next). One walk (SEGC = NC): from the initial state,
    then the final state. TWO_LEVEL (first level of the two-level pass: segments in parallel give batch-1 long
    sequences programs for every SM): segment 0 from the initial state, the others from zero, so their entering
    states lack the true state entering the segment; also stores the decay from the segment's start to each chunk
    (`tot`), the segment's exiting state and total decay. `_fwd_seg_kernel` chains the segments and
    `_fwd_fix_kernel` adds each segment's decayed entering state elementwise (x and B are read once)."""
    pid_pn = tl.program_id(0)
    b, hh, g = _batch_head(tl.program_id(1), H, G)
    seg = tl.program_id(2)
    Lp = NC * CS
    offs_p, offs_n, mp, mn, mpn, pn = _pn_block(pid_pn, NNB, P, N, BP, BN)
    c0 = seg * SEGC
    c1 = tl.minimum(c0 + SEGC, NC)
    NSEG = tl.num_programs(2)
    if not TWO_LEVEL and HAS_INIT:
        state = tl.load(init_ptr + (b * H + hh) * P * N + pn, mask=mpn, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BP, BN), dtype=tl.float32)
        if TWO_LEVEL and HAS_INIT:
            if seg == 0:
                state = tl.load(init_ptr + (b * H + hh) * P * N + pn, mask=mpn, other=0.0).to(tl.float32)
    if HAS_SEQ:
        # the document of the position before the segment (of position 0 for the first)
        state_doc = tl.load(seq_ptr + b * L + tl.maximum(c0 * CS - 1, 0))
    total = tl.full((), 1.0, tl.float32)
    for c in range(c0, c1):
        cum_last = tl.load(cum_ptr + (b * H + hh) * Lp + c * CS + CS - 1)
        decay = tl.exp(cum_last)
        if HAS_SEQ:
            doc_last = tl.load(seq_ptr + b * L + tl.minimum(c * CS + CS - 1, L - 1))
            decay = tl.where(doc_last == state_doc, decay, 0.0)
            state_doc = doc_last
        tl.store(states_ptr + ((b * NC + c) * H + hh) * P * N + pn, state.to(states_ptr.dtype.element_ty), mask=mpn)
        if TWO_LEVEL:
            if pid_pn == 0:
                tl.store(tot_ptr + (b * H + hh) * NC + c, total)
        total = total * decay
        state = state * decay
        state = _chunk_outer(state, x_ptr, B_ptr, seq_ptr, cum_ptr, dtp_ptr, b, hh, g, c, L, H, G, P, N, Lp, offs_p,
                             offs_n, mp, mn, cum_last, doc_last if HAS_SEQ else 0, CS, BK, True, HAS_SEQ, DOT_PREC,
                             DT)
    _store_walk_end(seg_ptr, segdec_ptr, final_ptr, b, hh, H, seg, NSEG, P, N, pn, mpn, pid_pn, state, total,
                    TWO_LEVEL)


@triton.jit
def _linear_step(a1, b1, a2, b2):
    # composition of h -> a1 h + b1, then h -> a2 h + b2 (the scan's combine: earlier element on the left)
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _fwd_seg_kernel(seg_ptr, segdec_ptr, final_ptr, PN, NSEG, BLOCK: tl.constexpr, SEGP: tl.constexpr):
    """Second level of the two-level state pass, elementwise over a block of (P, N): replaces each segment's exiting
    state (from its own start) by the true state entering it (segment 0's slot is left as it is: nothing reads
    it) and writes the final state. All segments are loaded at once and chained by a scan
    (h_k = decay_k h_{k-1} + local_k), not by a walk of NSEG dependent steps (run 8-fwd: 0.13 ms at 64K, one load
    in flight per step)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    k = tl.arange(0, SEGP)
    mk = k < NSEG
    rows = seg_ptr + (bh * NSEG + k[:, None]) * PN + offs[None, :]
    local = tl.load(rows, mask=mk[:, None] & m[None, :], other=0.0)
    dec = tl.load(segdec_ptr + bh * NSEG + k, mask=mk, other=1.0)
    _, h = tl.associative_scan((tl.broadcast_to(dec[:, None], (SEGP, BLOCK)), local), 0, _linear_step)
    # h[k] leaves segment k and enters segment k + 1
    tl.store(rows + PN, h, mask=(k < NSEG - 1)[:, None] & m[None, :])
    tl.store(final_ptr + bh * PN + offs, tl.sum(tl.where((k == NSEG - 1)[:, None], h, 0.0), 0), mask=m)


@triton.jit
def _fwd_fix_kernel(states_ptr, seg_ptr, tot_ptr, H, PN, NC, NSEG, SEGC, BLOCK: tl.constexpr):
    """Last step of the two-level state pass: the entering state of chunk c (of segment k >= 1) is its state from
    the segment's zero start plus the segment's true entering state decayed to c, elementwise over (P, N)."""
    pid = tl.program_id(0)
    c = SEGC + tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    hh = bh % H
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    ptr = states_ptr + ((b * NC + c) * H + hh) * PN + offs
    h_seg = tl.load(seg_ptr + ((b * H + hh) * NSEG + c // SEGC) * PN + offs, mask=m, other=0.0)
    local = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
    tl.store(ptr, (local + tl.load(tot_ptr + (b * H + hh) * NC + c) * h_seg).to(states_ptr.dtype.element_ty),
             mask=m)


@triton.jit
def _cb_block(cb_ptr, B_ptr, C_t, b, c, g, r0, s, ms, offs_n, mn, L, G, N, NC,
              CS: tl.constexpr, BM: tl.constexpr, USE_CB: tl.constexpr, DOT_PREC: tl.constexpr, DT: tl.constexpr):
    """C_t·B_s, rows r0..r0+BM of chunk c against positions s: loaded (precomputed per group, in the dtype it was
    stored in) or recomputed (float32) from the C_t tile in registers."""
    if USE_CB:
        cb = tl.load(cb_ptr + ((b * NC + c) * G + g) * CS * CS + (r0 + tl.arange(0, BM))[:, None] * CS
                     + (s - c * CS)[None, :])
    else:
        B_s = tl.load(B_ptr + ((b * L + s[:, None]) * G + g) * N + offs_n[None, :],
                      mask=ms[:, None] & mn[None, :], other=0.0).to(DT)
        cb = tl.dot(C_t, tl.trans(B_s), input_precision=DOT_PREC)
    return cb


@triton.jit
def _fwd_out_kernel(x_ptr, B_ptr, C_ptr, D_ptr, z_ptr, seq_ptr, dtp_ptr, cum_ptr, states_ptr, cb_ptr, out_ptr,
                    ypre_ptr, L, H, G, P, N, NC,
                    CS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr,
                    USE_CB: tl.constexpr, FOLD: tl.constexpr, DOT_PREC: tl.constexpr, DT: tl.constexpr):
    """One program per (head, block of BM positions t, batch), one (BM, headdim) accumulator. With
    row_t = exp(cum_t - cum_r) about the t block's first position r:
        y_t = row_t · [C_t·(exp(cum_r) h_in)ᵀ reach_t
                       + Σ_{s before the block} C_t·B_s exp(cum_r - cum_s) dt_s x_s]
              + Σ_{s in the block's diagonal} (C_t·B_s) exp(cum_t - cum_s) dt_s x_s   (masked)
    Every factor scaling an operand is <= 1. Without FOLD (documents, or by choice), every source block takes the
    masked path."""
    # heads vary fastest across programs, so the groups' heads read B, C (and C·B) from L2, not DRAM
    hh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = hh // (H // G)
    Lp = NC * CS
    row_cum = cum_ptr + (b * H + hh) * Lp
    row_dt = dtp_ptr + (b * H + hh) * Lp
    c, r0, t, mt = _position_block(pid_m, L, CS, BM)  # r0: the t block's offset in its chunk
    offs_p = tl.arange(0, BP)
    mp = offs_p < P
    offs_n = tl.arange(0, BN)
    mn = offs_n < N
    C_t = tl.load(C_ptr + ((b * L + t[:, None]) * G + g) * N + offs_n[None, :],
                  mask=mt[:, None] & mn[None, :], other=0.0).to(DT)
    C_s = C_t
    if HAS_SEQ:
        doc_t = _doc(seq_ptr, b, t, L)
        C_s = tl.where((doc_t == tl.load(seq_ptr + b * L + tl.maximum(c * CS - 1, 0)))[:, None], C_t, 0.0).to(DT)
    h_in = tl.load(states_ptr + ((b * NC + c) * H + hh) * P * N + offs_p[:, None] * N + offs_n[None, :],
                   mask=mp[:, None] & mn[None, :], other=0.0).to(tl.float32)
    cum_r = tl.load(row_cum + c * CS + r0)
    acc = tl.dot(C_s, tl.trans((h_in * tl.exp(cum_r)).to(DT)), input_precision=DOT_PREC)
    KD = r0 // BK  # source blocks strictly before the t block
    j0 = 0
    if FOLD:
        for j in range(0, KD):
            s = c * CS + j * BK + tl.arange(0, BK)
            ms = s < L
            cb = _cb_block(cb_ptr, B_ptr, C_t, b, c, g, r0, s, ms, offs_n, mn, L, G, N, NC, CS, BM, USE_CB,
                           DOT_PREC, DT)
            x_s = tl.load(x_ptr + ((b * L + s[:, None]) * H + hh) * P + offs_p[None, :],
                          mask=ms[:, None] & mp[None, :], other=0.0).to(tl.float32)
            cw = tl.exp(cum_r - tl.load(row_cum + s)) * tl.load(row_dt + s)
            acc = tl.dot(cb.to(DT), (x_s * cw[:, None]).to(DT), acc, input_precision=DOT_PREC)
        j0 = KD
    cum_t = tl.load(row_cum + t)
    row = tl.exp(cum_t - cum_r)
    acc = acc * row[:, None]
    span = cum_r - tl.load(row_cum + c * CS + r0 + BM - 1)
    for j in range(j0, KD + BM // BK):
        s = c * CS + j * BK + tl.arange(0, BK)
        ms = s < L
        cb = _cb_block(cb_ptr, B_ptr, C_t, b, c, g, r0, s, ms, offs_n, mn, L, G, N, NC, CS, BM, USE_CB,
                       DOT_PREC, DT).to(tl.float32)
        if HAS_SEQ:
            cb = tl.where(doc_t[:, None] == _doc(seq_ptr, b, s, L)[None, :], cb, 0.0)
        x_s = tl.load(x_ptr + ((b * L + s[:, None]) * H + hh) * P + offs_p[None, :],
                      mask=ms[:, None] & mp[None, :], other=0.0).to(DT)
        cum_s = tl.load(row_cum + s)
        # on the diagonal blocks the column factor exp(cum_r - cum_s) >= 1 (up to e^span): _decay_tile's guard
        decay = _decay_tile(row, tl.exp(cum_r - cum_s), cum_t[:, None], cum_s[None, :],
                            t[:, None] >= s[None, :], j >= KD, span)
        pk = (cb * decay * tl.load(row_dt + s)[None, :]).to(DT)
        acc = tl.dot(pk, x_s, acc, input_precision=DOT_PREC)
    xo = ((b * L + t[:, None]) * H + hh) * P + offs_p[None, :]
    mo = mt[:, None] & mp[None, :]
    if HAS_D:
        x_t = tl.load(x_ptr + xo, mask=mo, other=0.0).to(tl.float32)
        if D_PER_P:
            Dv = tl.load(D_ptr + hh * P + offs_p, mask=mp, other=0.0).to(tl.float32)
            acc += x_t * Dv[None, :]
        else:
            acc += x_t * tl.load(D_ptr + hh).to(tl.float32)
    if HAS_Z:
        tl.store(ypre_ptr + xo, acc.to(ypre_ptr.dtype.element_ty), mask=mo)
        zv = tl.load(z_ptr + xo, mask=mo, other=0.0).to(tl.float32)
        acc = acc * zv * tl.sigmoid(zv)
    tl.store(out_ptr + xo, acc.to(out_ptr.dtype.element_ty), mask=mo)


# ---------------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_state_kernel(dy_ptr, C_ptr, seq_ptr, cum_ptr, states_ptr, dfinal_ptr, dstates_ptr, dinit_ptr, dcl_ptr,
                      seg_ptr, segdec_ptr, tot_ptr, totd_ptr, L, H, G, P, N, NC, NNB, SEG,
                      CS: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                      HAS_DFINAL: tl.constexpr, HAS_SEQ: tl.constexpr, TWO_LEVEL: tl.constexpr,
                      DCL_ROWS: tl.constexpr, DOT_PREC: tl.constexpr, DT: tl.constexpr):
    """The reverse state pass over the chunks of one segment (program_id 2; SEG chunks each), last to first: stores
    the gradient leaving every chunk and its d cum_last partial (decay · Σ gradient ⊙ h_in; DCL_ROWS: as BP row
    sums, summed later by `_bwd_dt_kernel`, so the sequential loop has no reduction across warps). One segment:
    from dfinal, then the initial state's gradient. TWO_LEVEL (batch-1 long sequences: segments in parallel give
    programs for every SM): the last segment from dfinal, the others from zero, so their gradients lack the term of
    the gradient leaving the segment; also stores per chunk the decay from the segment's end to the chunk's exit
    (`tot`) and to its entry (`totd`), the segment's own part and decay product. `_bwd_seg_kernel` chains the
    segments by one scan and `_bwd_fix_kernel` adds the missing terms elementwise (dy and C are read once)."""
    pid_pn = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seg = tl.program_id(2)
    NSEG = tl.num_programs(2)
    NPN = tl.num_programs(0)
    b, hh, g = _batch_head(pid_bh, H, G)
    Lp = NC * CS
    # _pn_block written out: through the helper Triton 3.6 orders this kernel's sm_90 SASS differently (offline),
    # and this order is the one measured
    offs_p = (pid_pn // NNB) * BP + tl.arange(0, BP)
    offs_n = (pid_pn % NNB) * BN + tl.arange(0, BN)
    mp = offs_p < P
    mn = offs_n < N
    mpn = mp[:, None] & mn[None, :]
    pn = offs_p[:, None] * N + offs_n[None, :]
    gst = tl.zeros((BP, BN), dtype=tl.float32)
    if HAS_DFINAL:
        if seg == NSEG - 1:
            gst = tl.load(dfinal_ptr + (b * H + hh) * P * N + pn, mask=mpn, other=0.0).to(tl.float32)
    c_lo = seg * SEG
    c_hi = tl.minimum(c_lo + SEG, NC)
    prod = tl.full((), 1.0, tl.float32)
    for ci in range(c_hi - c_lo):
        c = c_hi - 1 - ci
        # gst: gradient of the state leaving chunk c
        tl.store(dstates_ptr + ((b * NC + c) * H + hh) * P * N + pn, gst.to(dstates_ptr.dtype.element_ty), mask=mpn)
        decay = tl.exp(tl.load(cum_ptr + (b * H + hh) * Lp + c * CS + CS - 1))
        if HAS_SEQ:
            hdoc = tl.load(seq_ptr + b * L + tl.maximum(c * CS - 1, 0))
            doc_last = tl.load(seq_ptr + b * L + tl.minimum(c * CS + CS - 1, L - 1))
            decay = tl.where(doc_last == hdoc, decay, 0.0)
        if TWO_LEVEL:
            if pid_pn == 0:
                # decay from the segment's end to chunk c's exit (dstates' missing term) and to its entry (d cum_last's)
                tl.store(tot_ptr + (b * H + hh) * NC + c, prod)
                tl.store(totd_ptr + (b * H + hh) * NC + c, prod * decay)
            prod = prod * decay
        h_in = tl.load(states_ptr + ((b * NC + c) * H + hh) * P * N + pn, mask=mpn, other=0.0)
        # Σ_n gst ⊙ h_in per row as the diagonal of gst · h_inᵀ: h_in is then a dot operand, which Triton's pipeliner
        # copies a step ahead. As an elementwise operand its load was where 33 % of this kernel's stall samples sat
        # (ncu, run 14 call 15). The dot rounds gst to the input dtype, as dstates' bf16 copy is for every other term
        gh = tl.dot(gst.to(DT), tl.trans(h_in.to(DT)), input_precision=DOT_PREC)
        rows = tl.sum(tl.where(offs_p[:, None] == offs_p[None, :], gh, 0.0), 1)
        if DCL_ROWS:
            tl.store(dcl_ptr + (((b * H + hh) * NC + c) * NPN + pid_pn) * BP + tl.arange(0, BP), decay * rows)
        else:
            tl.store(dcl_ptr + ((b * H + hh) * NC + c) * NPN + pid_pn, decay * tl.sum(rows, 0))
        gst = gst * decay
        gst = _chunk_outer(gst, dy_ptr, C_ptr, seq_ptr, cum_ptr, cum_ptr, b, hh, g, c, L, H, G, P, N, Lp, offs_p,
                           offs_n, mp, mn, 0.0, hdoc if HAS_SEQ else 0, CS, BK, False, HAS_SEQ, DOT_PREC, DT)
    _store_walk_end(seg_ptr, segdec_ptr, dinit_ptr, b, hh, H, seg, NSEG, P, N, pn, mpn, pid_pn, gst, prod, TWO_LEVEL)


@triton.jit
def _bwd_seg_kernel(seg_ptr, segdec_ptr, dinit_ptr, PN, NSEG, BLOCK: tl.constexpr, SEGP: tl.constexpr):
    """Second level of the two-level reverse state pass, elementwise over a block of (P, N):
    the gradient entering segment k is E_k = D_k E_{k+1} + l_k (l: the segment's own part, from dfinal for the
    last; D: its decay product), chained by one scan over the segments loaded last first. Slot k is replaced by
    the gradient leaving segment k, E_{k+1} (the last segment's slot is left: nothing reads it); E_0 is the initial
    state's gradient."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    r = tl.arange(0, SEGP)  # row r holds segment NSEG - 1 - r
    mr = r < NSEG
    k = NSEG - 1 - r
    local = tl.load(seg_ptr + (bh * NSEG + k[:, None]) * PN + offs[None, :], mask=mr[:, None] & m[None, :],
                    other=0.0)
    dec = tl.load(segdec_ptr + bh * NSEG + k, mask=mr, other=1.0)
    _, e = tl.associative_scan((tl.broadcast_to(dec[:, None], (SEGP, BLOCK)), local), 0, _linear_step)
    # e[r] = E_k enters segment k and leaves segment k - 1
    tl.store(seg_ptr + (bh * NSEG + k[:, None] - 1) * PN + offs[None, :], e,
             mask=(mr & (k >= 1))[:, None] & m[None, :])
    tl.store(dinit_ptr + bh * PN + offs, tl.sum(tl.where((k == 0)[:, None], e, 0.0), 0), mask=m)


@triton.jit
def _bwd_fix_kernel(dstates_ptr, states_ptr, seg_ptr, tot_ptr, totd_ptr, dcl_ptr, H, P, N, NC, NSEG, SEG, NPN, NNB,
                    BP: tl.constexpr, BN: tl.constexpr, DCL_ROWS: tl.constexpr):
    """Last step of the two-level reverse state pass, per (chunk c of segments 0..NSEG-2, (P, N) block of
    the walk): the gradient leaving c gets the gradient leaving its segment, G, decayed to c (tot); c's d cum_last
    partial (the walk's block slot) gets decay_c·tot·Σ G ⊙ h_in,c (totd) — its term from G. Documents: a chunk
    that starts a document has decay 0, so tot / totd are exactly 0 before it, as in one walk."""
    pid_pn = tl.program_id(0) % NPN
    c = tl.program_id(0) // NPN
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    hh = bh % H
    _, _, _, _, mpn, pn = _pn_block(pid_pn, NNB, P, N, BP, BN)
    g = tl.load(seg_ptr + ((b * H + hh) * NSEG + c // SEG) * P * N + pn, mask=mpn, other=0.0)
    ptr = dstates_ptr + ((b * NC + c) * H + hh) * P * N + pn
    local = tl.load(ptr, mask=mpn, other=0.0).to(tl.float32)
    tl.store(ptr, (local + tl.load(tot_ptr + (b * H + hh) * NC + c) * g).to(dstates_ptr.dtype.element_ty),
             mask=mpn)
    h_in = tl.load(states_ptr + ((b * NC + c) * H + hh) * P * N + pn, mask=mpn, other=0.0).to(tl.float32)
    totd = tl.load(totd_ptr + (b * H + hh) * NC + c)
    if DCL_ROWS:
        dptr = dcl_ptr + (((b * H + hh) * NC + c) * NPN + pid_pn) * BP + tl.arange(0, BP)
        tl.store(dptr, tl.load(dptr) + totd * tl.sum(g * h_in, 1))
    else:
        dptr = dcl_ptr + ((b * H + hh) * NC + c) * NPN + pid_pn
        tl.store(dptr, tl.load(dptr) + totd * tl.sum(tl.sum(g * h_in, 1), 0))


@triton.jit
def _bwd_dx_kernel(x_ptr, B_ptr, C_ptr, D_ptr, dy_ptr, seq_ptr, dtp_ptr, cum_ptr, dstates_ptr, cb_ptr,
                   dx_ptr, ddt_ptr, dcum_ptr, v_ptr, dD_ptr,
                   L, H, G, P, N, NC,
                   CS: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                   HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_SEQ: tl.constexpr, USE_CB: tl.constexpr,
                   CB_T: tl.constexpr, FOLD: tl.constexpr, HEADS_FASTEST: tl.constexpr,
                   DOT_PREC: tl.constexpr, DT: tl.constexpr):
    """Source-side gradients of one head for one block of positions s: dx (one dot per (s, t) tile; the quadratic
    part of d cum is `_bwd_dcb_kernel`'s, which forms dy_t·x_s per tile anyway), the direct part of ddt, the chunk
    state's share of d cum (v) and dD partials. C·B^T tiles: CB_T, the transposed copy `_bwd_dcb_kernel` stores
    (input dtype); else USE_CB, the precomputed float32 C·B; else recomputed. HEADS_FASTEST: grid (batch·heads,
    blocks), so the heads sharing a C·B tile run together and read it from L2. The diagonal tile comes last: its
    dy tile is dy_s, reused for the D term."""
    if HEADS_FASTEST:
        pid_m = tl.program_id(1)
        pid_bh = tl.program_id(0)
        NPM = tl.num_programs(1)
    else:
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        NPM = tl.num_programs(0)
    b, hh, g = _batch_head(pid_bh, H, G)
    Lp = NC * CS
    NM: tl.constexpr = CS // BM
    c = pid_m // NM
    sblk = pid_m % NM
    s0 = c * CS + sblk * BM
    s = s0 + tl.arange(0, BM)
    ms = s < L
    offs_p = tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    mp = offs_p < P
    mn = offs_n < N
    base = (b * H + hh) * Lp
    cbase = ((b * NC + c) * G + g) * CS * CS
    B_s = tl.load(B_ptr + ((b * L + s[:, None]) * G + g) * N + offs_n[None, :],
                  mask=ms[:, None] & mn[None, :], other=0.0).to(DT)
    dt_s = tl.load(dtp_ptr + base + s)
    cum_s = tl.load(cum_ptr + base + s)
    cum_last = tl.load(cum_ptr + base + c * CS + CS - 1)
    w = tl.exp(cum_last - cum_s)
    if HAS_SEQ:
        doc_s = _doc(seq_ptr, b, s, L)
        w = tl.where(doc_s == tl.load(seq_ptr + b * L + tl.minimum(c * CS + CS - 1, L - 1)), w, 0.0)
    xo = ((b * L + s[:, None]) * H + hh) * P + offs_p[None, :]
    mo = ms[:, None] & mp[None, :]
    x_s = tl.load(x_ptr + xo, mask=mo, other=0.0).to(tl.float32)
    gs = tl.load(dstates_ptr + ((b * NC + c) * H + hh) * P * N + offs_p[:, None] * N + offs_n[None, :],
                 mask=mp[:, None] & mn[None, :], other=0.0).to(DT)
    # the chunk state's gradient reaches x, B and cum through w_s dt_s x_s B_s^T
    S = tl.dot(B_s, tl.trans(gs), input_precision=DOT_PREC)
    v = tl.sum(x_s * dt_s[:, None] * S * w[:, None], 1)
    cum_r = tl.load(cum_ptr + base + s0 + BM - 1)  # the s block's last position
    span = tl.load(cum_ptr + base + s0) - cum_r
    col = tl.exp(cum_r - cum_s)
    if FOLD:
        # off-diagonal blocks (no documents): decay = col_s · row_t, folded into dy_t and the sum (as forward);
        # w_s = col_s · exp(cum_last - cum_r) (<= 1), so the state term shares the accumulator and the scaling
        acc = S * tl.exp(cum_last - cum_r)
    else:
        acc = S * w[:, None]
    for i in range(sblk + 1, NM):
        t = c * CS + i * BM + tl.arange(0, BM)
        mt = t < L
        cbT = _dx_cbt(cb_ptr, C_ptr, B_s, cbase, b, c, g, s, t, L, G, N, offs_n, mn, CS, USE_CB, CB_T, DOT_PREC, DT)
        cum_t = tl.load(cum_ptr + base + t)
        if FOLD:
            dy_t = tl.load(dy_ptr + ((b * L + t[:, None]) * H + hh) * P + offs_p[None, :],
                           mask=mt[:, None] & mp[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(cbT.to(DT), (dy_t * tl.exp(cum_t - cum_r)[:, None]).to(DT), acc, input_precision=DOT_PREC)
        else:
            dy_t = tl.load(dy_ptr + ((b * L + t[:, None]) * H + hh) * P + offs_p[None, :],
                           mask=mt[:, None] & mp[None, :], other=0.0).to(DT)
            LT = col[:, None] * tl.exp(cum_t - cum_r)[None, :]
            if HAS_SEQ:
                LT = tl.where(_doc(seq_ptr, b, t, L)[None, :] == doc_s[:, None], LT, 0.0)
            acc += tl.dot((cbT.to(tl.float32) * LT).to(DT), dy_t, input_precision=DOT_PREC)
    if FOLD:
        acc = acc * col[:, None]
    # the diagonal tile: t block = s block
    cbT = _dx_cbt(cb_ptr, C_ptr, B_s, cbase, b, c, g, s, s, L, G, N, offs_n, mn, CS, USE_CB, CB_T, DOT_PREC, DT)
    dy_s = tl.load(dy_ptr + xo, mask=mo, other=0.0).to(DT)
    LT = _decay_tile(col, tl.exp(cum_s - cum_r), cum_s[None, :], cum_s[:, None], s[None, :] >= s[:, None], True,
                     span)
    if HAS_SEQ:
        LT = tl.where(doc_s[None, :] == doc_s[:, None], LT, 0.0)
    acc += tl.dot((cbT.to(tl.float32) * LT).to(DT), dy_s, input_precision=DOT_PREC)
    x_s = tl.load(x_ptr + xo, mask=mo, other=0.0).to(tl.float32)  # reloaded (L1/L2) rather than held across loops
    dx = acc * dt_s[:, None]
    if HAS_D:
        dy_s = dy_s.to(tl.float32)
        if D_PER_P:
            dx += dy_s * tl.load(D_ptr + hh * P + offs_p, mask=mp, other=0.0).to(tl.float32)[None, :]
        else:
            dx += dy_s * tl.load(D_ptr + hh).to(tl.float32)
        tl.store(dD_ptr + ((b * NPM + pid_m) * H + hh) * P + offs_p, tl.sum(dy_s * x_s, 0), mask=mp)
    tl.store(dx_ptr + xo, dx.to(dx_ptr.dtype.element_ty), mask=mo)
    tl.store(ddt_ptr + base + s, tl.sum(x_s * acc, 1))
    tl.store(dcum_ptr + base + s, -v)
    tl.store(v_ptr + base + s, v)


@triton.jit
def _dcb_cb_tile(C_ptr, B_ptr, cbt_ptr, b, g, c, i, j, L, G, N, NC, CS: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, STORE_CBT: tl.constexpr, DOT_PREC: tl.constexpr, DT: tl.constexpr):
    """The dCB kernel's (t block i, s block j) tile pair of chunk c: positions, their masks, and C_t·B_s^T in
    float32. STORE_CBT: also its transposed copy for the dx kernel, which reads it as (s, t): no C·B pass of its
    own, half the bytes in bf16. A helper with one caller since v9-bwd's removal: written inline, Triton 3.6
    schedules the same sm_90 instructions in another order (offline SASS), so it stays as measured."""
    t = c * CS + i * BM + tl.arange(0, BM)
    s = c * CS + j * BM + tl.arange(0, BM)
    mt = t < L
    ms = s < L
    offs_n = tl.arange(0, BN)
    mn = offs_n < N
    C_t = tl.load(C_ptr + ((b * L + t[:, None]) * G + g) * N + offs_n[None, :],
                  mask=mt[:, None] & mn[None, :], other=0.0).to(DT)
    B_s = tl.load(B_ptr + ((b * L + s[:, None]) * G + g) * N + offs_n[None, :],
                  mask=ms[:, None] & mn[None, :], other=0.0).to(DT)
    cb = tl.dot(C_t, tl.trans(B_s), input_precision=DOT_PREC)
    if STORE_CBT:
        tl.store(cbt_ptr + ((b * NC + c) * G + g) * CS * CS + (j * BM + tl.arange(0, BM))[:, None] * CS
                 + (i * BM + tl.arange(0, BM))[None, :], tl.trans(cb).to(cbt_ptr.dtype.element_ty))
    return t, s, mt, ms, cb


@triton.jit
def _bwd_dcb_kernel(x_ptr, B_ptr, C_ptr, dy_ptr, seq_ptr, dtp_ptr, cum_ptr, dcb_ptr, part_ptr, cbt_ptr,
                    L, H, G, P, N, NC,
                    CS: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                    HAS_SEQ: tl.constexpr, STORE_CBT: tl.constexpr, DOT_PREC: tl.constexpr, DT: tl.constexpr):
    """Gradient of C_t·B_s for one causal (t block i, s block j) tile of a chunk, summed over the group's heads:
    dCB[t, s] = Σ_h (dy_t·x_s) L_ts dt_s. dB and dC then follow once per group (`_bwd_bc_kernel`) instead of
    once per head. Each head's d cum (t side: row sums of dCB_h ⊙ C·B, s side: minus the column sums) goes to
    its own slot of `part` (slot j for the t side, NM + i for the s side), summed in fixed order later."""
    pid_c, b, g, HPG, Lp = _group_program(H, G, NC, CS)
    NM: tl.constexpr = CS // BM
    NPAIR: tl.constexpr = NM * (NM + 1) // 2
    c = pid_c // NPAIR
    k = pid_c % NPAIR
    # k -> (i, j), j <= i, in row order: (0,0), (1,0), (1,1), (2,0), ...
    i = 0
    for ii in tl.static_range(1, NM):
        i += (k >= ii * (ii + 1) // 2).to(tl.int32)
    j = k - i * (i + 1) // 2
    offs_p = tl.arange(0, BP)
    mp = offs_p < P
    t, s, mt, ms, cb = _dcb_cb_tile(C_ptr, B_ptr, cbt_ptr, b, g, c, i, j, L, G, N, NC, CS, BM, BN, STORE_CBT,
                                    DOT_PREC, DT)
    causal = t[:, None] >= s[None, :]
    if HAS_SEQ:
        same_doc = _doc(seq_ptr, b, t, L)[:, None] == _doc(seq_ptr, b, s, L)[None, :]
    acc = tl.zeros((BM, BM), dtype=tl.float32)
    # the head's cum / dt vectors are loaded one head ahead: Triton 3.6 pipelines the dy and x tiles of this loop but
    # leaves these five loads in it, ahead of the decay tile that the dot's epilogue waits on (offline sm_90 TTGIR;
    # session 7 on the H100: dCB 0.39 instead of 0.45 ms per f+b at 65,536 tokens)
    base0 = (b * H + g * HPG) * Lp
    n_cum_t = tl.load(cum_ptr + base0 + t)
    n_cum_s = tl.load(cum_ptr + base0 + s)
    n_dt_s = tl.load(dtp_ptr + base0 + s)
    n_cum_r = tl.load(cum_ptr + base0 + c * CS + i * BM)
    n_cum_e = tl.load(cum_ptr + base0 + c * CS + i * BM + BM - 1)
    for hi in range(HPG):
        hh = g * HPG + hi
        base = (b * H + hh) * Lp
        cum_t, cum_s, dt_s, cum_r, cum_e = n_cum_t, n_cum_s, n_dt_s, n_cum_r, n_cum_e
        nbase = (b * H + g * HPG + tl.minimum(hi + 1, HPG - 1)) * Lp  # the last head loads itself again, unused
        n_cum_t = tl.load(cum_ptr + nbase + t)
        n_cum_s = tl.load(cum_ptr + nbase + s)
        n_dt_s = tl.load(dtp_ptr + nbase + s)
        n_cum_r = tl.load(cum_ptr + nbase + c * CS + i * BM)  # reference: the t block's first position
        n_cum_e = tl.load(cum_ptr + nbase + c * CS + i * BM + BM - 1)
        span = cum_r - cum_e
        Lm = _decay_tile(tl.exp(cum_t - cum_r), tl.exp(cum_r - cum_s) * dt_s, cum_t[:, None], cum_s[None, :],
                         causal, i == j, span)
        if i == j:
            if span > 60.0:  # _decay_tile's exact fallback does not carry the column factor's dt_s
                Lm = Lm * dt_s[None, :]
        if HAS_SEQ:
            Lm = tl.where(same_doc, Lm, 0.0)
        dy_t = tl.load(dy_ptr + ((b * L + t[:, None]) * H + hh) * P + offs_p[None, :],
                       mask=mt[:, None] & mp[None, :], other=0.0).to(DT)
        x_s = tl.load(x_ptr + ((b * L + s[:, None]) * H + hh) * P + offs_p[None, :],
                      mask=ms[:, None] & mp[None, :], other=0.0).to(DT)
        q = tl.dot(dy_t, tl.trans(x_s), input_precision=DOT_PREC) * Lm
        acc += q
        r = q * cb
        tl.store(part_ptr + ((b * H + hh) * 2 * NM + j) * Lp + t, tl.sum(r, 1))
        tl.store(part_ptr + ((b * H + hh) * 2 * NM + NM + i) * Lp + s, -tl.sum(r, 0))
    tl.store(dcb_ptr + ((b * NC + c) * G + g) * CS * CS + (i * BM + tl.arange(0, BM))[:, None] * CS
             + (j * BM + tl.arange(0, BM))[None, :], acc.to(dcb_ptr.dtype.element_ty))


@triton.jit
def _bwd_bc_kernel(x_ptr, B_ptr, C_ptr, dy_ptr, seq_ptr, dtp_ptr, cum_ptr, states_ptr, dstates_ptr, dcb_ptr,
                   dB_ptr, dC_ptr, dcum_ptr,
                   L, H, G, P, N, NC,
                   CS: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                   DO_DC: tl.constexpr, HAS_SEQ: tl.constexpr, DOT_PREC: tl.constexpr, DT: tl.constexpr):
    """dC (DO_DC) or dB of one block of positions u, per group: the state terms head by head (dC: e_u dy_u h_in,
    also each head's d cum from it; dB: w_u dt_u x_u dstate_out), then the quadratic term once for all heads
    from the head-summed dCB (dC_u = Σ_s dCB[u, s] B_s, dB_u = Σ_t dCB[t, u] C_t)."""
    pid_m, b, g, HPG, Lp = _group_program(H, G, NC, CS)
    NM: tl.constexpr = CS // BM
    c = pid_m // NM
    mblk = pid_m % NM
    u = c * CS + mblk * BM + tl.arange(0, BM)
    mu = u < L
    offs_p = tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    mp = offs_p < P
    mn = offs_n < N
    mpn = mp[:, None] & mn[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if DO_DC:
        C_u = tl.load(C_ptr + ((b * L + u[:, None]) * G + g) * N + offs_n[None, :],
                      mask=mu[:, None] & mn[None, :], other=0.0)  # input dtype: fewer registers across the loop
        if HAS_SEQ:
            reach = _doc(seq_ptr, b, u, L) == tl.load(seq_ptr + b * L + tl.maximum(c * CS - 1, 0))
        # each head's cum vector is loaded one head ahead: the pipeliner leaves it in the loop, where every head
        # waited on it (the dCB kernel's case; session 7: -0.007 ms per f+b at 65,536 tokens, both dstates)
        n_cum = tl.load(cum_ptr + (b * H + g * HPG) * Lp + u)
        for hi in range(HPG):
            hh = g * HPG + hi
            e = tl.exp(n_cum)
            n_cum = tl.load(cum_ptr + (b * H + g * HPG + tl.minimum(hi + 1, HPG - 1)) * Lp + u)
            if HAS_SEQ:
                e = tl.where(reach, e, 0.0)
            dy_u = tl.load(dy_ptr + ((b * L + u[:, None]) * H + hh) * P + offs_p[None, :],
                           mask=mu[:, None] & mp[None, :], other=0.0).to(DT)
            h_in = tl.load(states_ptr + ((b * NC + c) * H + hh) * P * N + offs_p[:, None] * N + offs_n[None, :],
                           mask=mpn, other=0.0).to(DT)
            tmp = tl.dot(dy_u, h_in, input_precision=DOT_PREC) * e[:, None]
            tl.store(dcum_ptr + (b * H + hh) * Lp + u, tl.sum(C_u.to(tl.float32) * tmp, 1))
            acc += tmp
        for j in range(0, mblk + 1):
            s = c * CS + j * BM + tl.arange(0, BM)
            B_s = tl.load(B_ptr + ((b * L + s[:, None]) * G + g) * N + offs_n[None, :],
                          mask=(s < L)[:, None] & mn[None, :], other=0.0).to(DT)
            d = tl.load(dcb_ptr + ((b * NC + c) * G + g) * CS * CS + (mblk * BM + tl.arange(0, BM))[:, None] * CS
                        + (j * BM + tl.arange(0, BM))[None, :]).to(DT)
            acc += tl.dot(d, B_s, input_precision=DOT_PREC)
        tl.store(dC_ptr + ((b * L + u[:, None]) * G + g) * N + offs_n[None, :], acc.to(dC_ptr.dtype.element_ty),
                 mask=mu[:, None] & mn[None, :])
    else:
        if HAS_SEQ:
            in_last = _doc(seq_ptr, b, u, L) == tl.load(seq_ptr + b * L + tl.minimum(c * CS + CS - 1, L - 1))
        for hi in range(HPG):
            hh = g * HPG + hi
            cum_u = tl.load(cum_ptr + (b * H + hh) * Lp + u)
            w = tl.exp(tl.load(cum_ptr + (b * H + hh) * Lp + c * CS + CS - 1) - cum_u) \
                * tl.load(dtp_ptr + (b * H + hh) * Lp + u)
            if HAS_SEQ:
                w = tl.where(in_last, w, 0.0)
            x_u = tl.load(x_ptr + ((b * L + u[:, None]) * H + hh) * P + offs_p[None, :],
                          mask=mu[:, None] & mp[None, :], other=0.0).to(tl.float32)
            gs = tl.load(dstates_ptr + ((b * NC + c) * H + hh) * P * N + offs_p[:, None] * N + offs_n[None, :],
                         mask=mpn, other=0.0).to(DT)
            acc += tl.dot((x_u * w[:, None]).to(DT), gs, input_precision=DOT_PREC)
        for i in range(mblk, NM):
            t = c * CS + i * BM + tl.arange(0, BM)
            C_t = tl.load(C_ptr + ((b * L + t[:, None]) * G + g) * N + offs_n[None, :],
                          mask=(t < L)[:, None] & mn[None, :], other=0.0).to(DT)
            d = tl.load(dcb_ptr + ((b * NC + c) * G + g) * CS * CS + (i * BM + tl.arange(0, BM))[:, None] * CS
                        + (mblk * BM + tl.arange(0, BM))[None, :]).to(DT)
            acc += tl.dot(tl.trans(d), C_t, input_precision=DOT_PREC)
        tl.store(dB_ptr + ((b * L + u[:, None]) * G + g) * N + offs_n[None, :], acc.to(dB_ptr.dtype.element_ty),
                 mask=mu[:, None] & mn[None, :])


@triton.jit
def _bwd_dt_kernel(dt_ptr, dtb_ptr, A_ptr, dtp_ptr, ddt_ptr, dcuma_ptr, dcumb_ptr, v_ptr, dcl_ptr, part_ptr,
                   ddt_out_ptr, dA_part_ptr, dbias_part_ptr,
                   L, H, NC, NPN, lo, hi,
                   CS: tl.constexpr, BPN: tl.constexpr, PART_BM: tl.constexpr,
                   HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr):
    c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, hh, _ = _batch_head(pid_bh, H, 1)
    Lp = NC * CS
    idx = tl.arange(0, CS)
    t = c * CS + idx
    base = (b * H + hh) * Lp + t
    dcum = tl.load(dcuma_ptr + base) + tl.load(dcumb_ptr + base)
    # _bwd_dcb_kernel's per-tile d cum: slot j (t side, j <= own block), NM + i (s side, i >= own)
    NMQ: tl.constexpr = CS // PART_BM
    blk = idx // PART_BM
    pbase = (b * H + hh) * 2 * NMQ * Lp + t
    for q in tl.static_range(NMQ):
        dcum += tl.load(part_ptr + pbase + q * Lp, mask=blk >= q, other=0.0)
    for q in tl.static_range(NMQ):
        dcum += tl.load(part_ptr + pbase + (NMQ + q) * Lp, mask=blk <= q, other=0.0)
    offs = tl.arange(0, BPN)
    dcl = tl.load(dcl_ptr + ((b * H + hh) * NC + c) * NPN + offs, mask=offs < NPN, other=0.0)
    dcum_last = tl.sum(tl.load(v_ptr + base), 0) + tl.sum(dcl, 0)
    dcum += tl.where(idx == CS - 1, dcum_last, 0.0)
    da = tl.sum(dcum, 0) - tl.cumsum(dcum, 0) + dcum  # cum_t = Σ_{r≤t} a_r  =>  da_r = Σ_{t≥r} dcum_t
    A = tl.load(A_ptr + hh).to(tl.float32)
    dtp = tl.load(dtp_ptr + base)
    tl.store(dA_part_ptr + (b * NC + c) * H + hh, tl.sum(dtp * da, 0))
    gd = tl.load(ddt_ptr + base) + A * da
    valid = t < L
    raw = tl.load(dt_ptr + (b * L + t) * H + hh, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(dtb_ptr + hh).to(tl.float32)
    if HAS_LIMIT:
        v = raw
        if SOFTPLUS:
            v = _softplus(raw)
        gd = tl.where((v >= lo) & (v <= hi), gd, 0.0)
    if SOFTPLUS:
        gd = tl.where(raw > 20.0, gd, gd * tl.sigmoid(raw))
    gd = tl.where(valid, gd, 0.0)
    tl.store(ddt_out_ptr + (b * L + t) * H + hh, gd.to(ddt_out_ptr.dtype.element_ty), mask=valid)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + (b * NC + c) * H + hh, tl.sum(gd, 0))


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------
# Launch settings, fixed (no autotuning: it is slow under the interpreter and in CI). benchmarks/bench_ssd.py --sweep
# overrides them to compare variants in one run. The values are tuned on H100 (sm_90: 132 SMs, 64K registers and
# 228 KB of shared memory per SM; Triton 3.6) and each comment says what the entry is and why it has that value there;
# other GPUs run the same settings untuned. The measurements behind them: notes/ssd_kernels.md.
# On H100 every big kernel here is latency-bound (dependent loads, short dots and per-head elementwise work at
# 128-255 registers), not bound by bytes or tensor cores: settings that keep more small programs resident per SM,
# or that take a dependent load out of a loop, win; bigger tiles, more warps and deeper pipelines mostly lose.
CONFIG = dict(
    # chunks longer than this are computed as chunks of this length: the same function (states pass exactly through
    # the extra boundaries; only rounding differs). H100: 128, because two 128-position chunks have 6 causal 64 x 64
    # tile pairs where one 256-position chunk has 10, so the backward's dx and dCB and the forward's output kernel do
    # 40 % less work for twice the state steps (forward+backward -0.1 to -0.4 ms per 65,536 tokens). Cost: twice the
    # saved entering states (bf16, one per chunk and head). None: chunk_size as given
    max_chunk=128,
    state_bk=64,  # positions per tl.dot inside the sequential state kernels
    state_bn=64,  # dstate block of the sequential state kernels
    # headdim blocks shrink (64 -> 32 -> 16) until batch*heads*blocks reaches this: 264 = two programs on each of
    # H100's 132 SMs (the reverse walk's registers fit 2 per SM)
    state_min_programs=264,
    # forward output kernel: positions per program, warps (None: 8 if dstate >= 128), source positions per tile of
    # its quadratic part (None: out_bm), pipelining depth (None: as `stages`), register cap (None: 128 for 64-position
    # blocks at headdim <= 64 and dstate <= 64 or 128, 4 programs per SM; 0: none), C·B precomputed per group from
    # this dstate on (for the backward: cb_min_dstate), off-diagonal blocks without documents with the decay folded
    # into the operands (the backward's dx has its own key, fold_decay). The C·B it reads is stored in bf16 for bf16
    # inputs (the folded blocks cast it for the dot anyway). H100: 64 x 64 tiles, 4 warps, 1 stage, 4 programs per
    # SM, because the kernel is a short chain of dependent L2 reads and dots that more resident programs hide best
    # (2 stages or 8 warps are 0.1-0.3 ms slower per call); bf16 C·B (half the bytes) and the folded tiles (no
    # elementwise pass) took -13 % of the forward at dstate 128 and -16 % at dstate 64
    out_bm=64, out_warps=4, out_bk=None, out_stages=1, out_maxnreg=None, out_cb_min_dstate=0, out_fold_decay=True,
    cb_causal=True,  # the forward's C·B kernel computes only the blocks on and below the diagonal
    state_maxnreg=None,  # register cap of the forward state kernel
    # two-level forward state pass when batch × heads × blocks < state_seg_below (None: state_seg_programs; 0 there:
    # always one sequential walk) and the walk would be at least state_seg_min_nc chunks: segments of at least
    # state_seg_min_chunks chunks, enough for about state_seg_programs programs: segments walked in parallel,
    # chained by one scan, their chunks' entering states fixed up elementwise (x and B read once). H100: the walk
    # holds 3 programs per SM, so below 256 programs (0.65 of a wave) one walk leaves SMs idle, and ~384 programs
    # (about one wave) pay for the fix-up; more programs than the GPU holds only queue and grow the fix-up. Only for
    # walks of 128 chunks or more: shorter walks gain less than the fix-up costs
    state_seg_programs=384, state_seg_below=256, state_seg_min_chunks=4, state_seg_min_nc=128,
    # the forward state pass's own positions per dot, dstate block, grid target and pipelining (None: state_bk,
    # state_bn, state_min_programs, `stages`); the backward's state pass keeps the shared keys. H100: 256 positions
    # per dot in 2 stages (fewer, longer dots in the walk; float32 inputs are capped at 128, since two stages of 256
    # would need 256 KB of shared memory), and one walk from 128 programs (256 programs of whole headdim blocks beat
    # 512 of half blocks)
    fwd_state_bk=256, fwd_state_bn=None, fwd_state_min_programs=128, fwd_state_stages=2,
    bwd_bm=64,  # positions per block of the backward's dCB, dB and dC kernels, and dx's target blocks
    stages=None,  # software pipelining depth; None: 1 at dstate >= 128 (registers, shared memory), else 2
    cb_min_heads_per_group=4,  # precompute C·B once per group when at least this many heads share it...
    cb_min_dstate=128,  # ...and dstate is large enough that recomputing it per head costs more than loading it
    # off-diagonal blocks without documents: decay folded into the operands (bwd dx); None: at dstate >= 128 only
    # (H100: at dstate 128 it saves an elementwise pass, -1 % forward+backward; at dstate 64 a folded kernel's
    # registers went 157 -> 228 and it ran 8 % slower)
    fold_decay=None,
    dcb_warps=4, bc_warps=None,  # warps of _bwd_dcb_kernel and _bwd_bc_kernel (None: 8 if dstate >= 128)
    # backward launch settings per kernel; None: as `stages` / 4 warps / state_bn. H100: 2 stages for dCB and for
    # dB / dC (their in-loop tiles do not grow with dstate, and a pipelined loop hides the next head's loads); dx in
    # 1 stage at dstate 128 (2 stages lose 0.02-0.1 ms). Register caps (0: none; the defaults are rules at the
    # launch): dx 168 at dstate <= 64, and at dstate 128 with 128-position chunks (3 programs per SM instead of 2,
    # a few spills); dB / dC 128 at dstate <= 128 (2 programs of 8 warps per SM instead of 1); dCB uncapped (caps
    # of 168 / 128 lose 0.2 / 1.0 ms)
    dcb_stages=2, bc_stages=2, dx_stages=None,
    dx_maxnreg=None, dcb_maxnreg=None, bc_maxnreg=None,
    # dx warps. H100: 4; 8 warps over 128-position blocks, several heads per program and other larger dx programs
    # all lost to more resident 4-warp programs
    dx_warps=4,
    bwd_cbt=True,  # the dCB kernel stores C·B transposed (input dtype) for dx: no C·B launch in the backward
    # dx grid with heads fastest (a C·B tile read once from DRAM, then from L2 by each head) or blocks fastest; None:
    # heads fastest when a batch row's C·Bᵀ is at least dx_heads_fastest_bytes. H100 (50 MB of L2): from 4 MB (16K
    # tokens per row at 128-position chunks) the heads sharing a tile must run together for it to stay in L2; below
    # that, blocks fastest (heads fastest costs ~0.03 ms at 4K tokens per row)
    dx_heads_fastest=None, dx_heads_fastest_bytes=4 << 20,
    bwd_state_warps=None, bwd_state_stages=2, bwd_state_bn=None,
    bwd_state_bk=None,  # positions per dot in the reverse state pass (None: state_bk)
    bwd_state_dcl_rows=False,  # d cum_last as row sums per chunk (no cross-warp reduction in the sequential loop)
    # two-level reverse state pass (walk, scan, fix-up) when batch × heads × blocks × dstate blocks < seg_below:
    # segments of >= seg_chunks chunks, about seg_target programs; bwd_state_segments forces a number (1: one
    # sequential pass). The fix-up moves headdim × dstate per chunk, so the dstate blocks count twice in the rule:
    # one walk turns dstate blocks into programs instead. H100: two-level below 512 (at 32 heads of headdim 64:
    # dstate 128 at batch 2 and less, dstate 64 at batch 4 and less), towards ~256 programs (the walk holds 2
    # programs per SM; fewer segments keep the fix-up small). The walk runs uncapped: its d cum_last dot's
    # accumulator needs the registers
    bwd_state_segments=None, bwd_state_seg_below=512, bwd_state_seg_target=256, bwd_state_seg_chunks=8,
    bwd_state_maxnreg=None,
    # after a two-level reverse walk, dCB on a side stream beside the scan and the fix-up (H100: the fix-up is
    # bandwidth-bound and dCB latency-bound, so they overlap: -0.01 to -0.03 ms per call at 32K-64K tokens per row)
    bwd_overlap=True,
)


def _cb(B, C, cs, NC, prec, ddt_, causal_upto=0, dtype=torch.float32):
    """(b, NC, G, cs, cs) C·B per chunk (computed in float32, stored as dtype). causal_upto: the readers' position
    blocks (a multiple of this kernel's blocks): blocks above the diagonal are then not computed (their entries are
    left unwritten), which the forward output kernel never reads when its position blocks are no taller than these."""
    b, L, G, N = B.shape
    BN = _pow2(N)
    BM = min(cs, 64 if BN <= 128 else 32)
    cb = torch.empty(b, NC, G, cs, cs, device=B.device, dtype=dtype)
    NM = cs // BM
    causal = 0 < causal_upto <= BM
    _launch(_cb_kernel, (NC, NM * (NM + 1) // 2 if causal else NM * NM, b * G), B, C, cb, L, G, N, NC,
            CS=cs, BM=BM, BN=BN, DOT_PREC=prec, DT=ddt_, CAUSAL=causal, num_warps=4)
    return cb


def _state_blocks(b: int, H: int, P: int, N: int, bn_key: str = "state_bn"):
    """Blocks of the sequential state kernels: smaller headdim blocks when batch × heads alone leaves SMs idle."""
    BN = min(_pow2(N), CONFIG[bn_key] or CONFIG["state_bn"])
    BP = min(_pow2(P), 64)
    while BP > 16 and b * H * triton.cdiv(P, BP) * triton.cdiv(N, BN) < CONFIG["state_min_programs"]:
        BP //= 2
    return BP, BN


def _fwd_state_plan(b: int, H: int, P: int, N: int, NC: int):
    """(BP, BN, chunks per segment, segments) of the forward state pass: one sequential walk over all chunks with
    headdim blocks shrinking until the grid reaches fwd_state_min_programs, or (long sequences, small batch)
    segments walked in parallel so that the grid reaches state_seg_programs. The forward's own keys (None: the
    keys the backward's state pass uses too)."""
    target, min_chunks = CONFIG["state_seg_programs"], CONFIG["state_seg_min_chunks"]
    BN = min(_pow2(N), CONFIG["fwd_state_bn"] or CONFIG["state_bn"])
    BP = min(_pow2(P), 64)
    base = b * H * triton.cdiv(P, BP) * triton.cdiv(N, BN)
    below = CONFIG["state_seg_below"] or target
    if target and base < below and NC >= max(2 * min_chunks, CONFIG["state_seg_min_nc"]):
        nseg = min(triton.cdiv(target, base), NC // min_chunks)
        segc = triton.cdiv(NC, nseg)
        nseg = triton.cdiv(NC, segc)
        if nseg > 1:
            return BP, BN, segc, nseg
    min_programs = CONFIG["fwd_state_min_programs"] or CONFIG["state_min_programs"]
    while BP > 16 and b * H * triton.cdiv(P, BP) * triton.cdiv(N, BN) < min_programs:
        BP //= 2
    return BP, BN, NC, 1


def _dot_prec(dtype):
    # float32 inputs get float32 products (tf32 would cost ~1e-3 relative error); half inputs use their own type
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_dtype(dtype):
    # the interpreter multiplies bfloat16 as raw bits (numpy has no bfloat16): give it float32 operands there
    if dtype == torch.bfloat16:
        return tl.float32 if _INTERPRET else tl.bfloat16
    return tl.float16 if dtype == torch.float16 else tl.float32


def _warps(BN: int, key: str) -> int:
    if _INTERPRET:
        return 4
    return CONFIG[key] or (8 if BN >= 128 else 4)


def _bwd_state_segments(b: int, H: int, P: int, N: int, NC: int):
    """(segments, chunks per segment) of the reverse state pass: one segment while batch × heads × blocks fill the
    GPU, else enough segments (at least CONFIG bwd_state_seg_chunks chunks each) to reach bwd_state_seg_target
    programs: the two-level pass adds an elementwise fix-up (its bytes grow with dstate) but runs the sequential
    part in parallel."""
    nseg = CONFIG["bwd_state_segments"]
    if nseg is None:
        nnb = triton.cdiv(N, min(_pow2(N), CONFIG["bwd_state_bn"] or CONFIG["state_bn"]))
        base = b * H * triton.cdiv(P, min(_pow2(P), 64)) * nnb
        nseg = 1
        if base * nnb < CONFIG["bwd_state_seg_below"]:
            nseg = min(triton.cdiv(CONFIG["bwd_state_seg_target"], base), NC // CONFIG["bwd_state_seg_chunks"])
    nseg = max(1, min(nseg, NC))
    seg_len = triton.cdiv(NC, nseg)
    return triton.cdiv(NC, seg_len), seg_len


def _maxnreg(key: str, auto: Optional[int] = None) -> dict:
    # a register cap per thread: 168 lets 3 four-warp programs share an SM (255: 2), at the price of a few spills;
    # CONFIG None takes `auto`, 0 means no cap
    cap = auto if CONFIG[key] is None else CONFIG[key]
    return {} if _INTERPRET or not cap else {"maxnreg": cap}


def _bwd_state_warps() -> int:
    return 4 if _INTERPRET else (CONFIG["bwd_state_warps"] or 4)


def _bm(cs: int, key: str, BP: int, BN: int) -> int:
    # very large (headdim, dstate) tiles need shorter position blocks to fit shared memory
    return min(cs, CONFIG[key], 32 if BP * BN >= 128 * 256 else 128)


def _stages(BP: int, BN: int, key: Optional[str] = None) -> int:
    if BP * BN >= 128 * 256:
        return 1
    return (CONFIG[key] if key else None) or CONFIG["stages"] or (1 if BN >= 128 else 2)


def _use_cb(H: int, G: int, N: int, min_dstate=None) -> bool:
    min_dstate = CONFIG["cb_min_dstate"] if min_dstate is None else min_dstate
    return H // G >= CONFIG["cb_min_heads_per_group"] and N >= min_dstate


def _fold(N: int, seq_idx, key: str = "fold_decay") -> bool:
    # documents can cut an off-diagonal block, which then needs the masked tile
    fold = CONFIG[key]
    return seq_idx is None and (N >= 128 if fold is None else bool(fold))


def _check_inputs(x, chunk_size):
    if x.dtype == torch.float64:
        raise TypeError("lit_mamba2.kernels.ssd: float64 inputs are not supported by the Triton kernels; "
                        "use impl='torch' for float64 or cast to float32")
    if chunk_size not in (16, 32, 64, 128, 256):
        raise ValueError(f"lit_mamba2.kernels.ssd: chunk_size must be one of 16, 32, 64, 128, 256, got {chunk_size}")
    if x.shape[3] > 128:
        raise ValueError(f"lit_mamba2.kernels.ssd: headdim must be at most 128, got {x.shape[3]}")


_STAT_KEYS = ("CS", "BN", "BP", "BM", "BK", "HPP", "DO_DC", "num_warps", "num_stages", "maxnreg")
STATS: dict = {}  # kernel name -> (registers, spills, shared bytes), filled when LIT_MAMBA2_KERNEL_STATS=1


_SIDE_STREAMS = {}


def _side_stream(x: Tensor):
    """One extra stream per device for kernels that can run beside the current stream's (None off CUDA)."""
    if not x.is_cuda:
        return None
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if dev not in _SIDE_STREAMS:
        _SIDE_STREAMS[dev] = torch.cuda.Stream(dev)
    return _SIDE_STREAMS[dev]


def _launch(kernel, grid, *args, **kw):
    handle = kernel[grid](*args, **kw)
    if os.environ.get("LIT_MAMBA2_KERNEL_STATS") == "1" and handle is not None and not _INTERPRET:
        key = (kernel.fn.__name__,) + tuple(f"{k}={kw[k]}" for k in _STAT_KEYS if k in kw)
        STATS.setdefault(key, (getattr(handle, "n_regs", None), getattr(handle, "n_spills", None),
                               getattr(handle.metadata, "shared", None) if hasattr(handle, "metadata") else None))
    return handle


def _sizes(x, B, chunk_size):
    """(batch, seqlen, heads, headdim, groups, dstate, chunks, padded seqlen) of an ssd call (x: (b, L, H, P),
    B: (b, L, G, N)); ceil division written out, so that it also takes the fakes' symbolic sizes."""
    b, L, H, P = x.shape
    NC = -(-L // chunk_size)
    return b, L, H, P, B.shape[2], B.shape[3], NC, NC * chunk_size


def _c(t):
    """t contiguous, with the contiguous strides on size-1 dimensions too (a view, no copy): is_contiguous ignores
    those, and outputs made by empty_like or elementwise ops from an input would keep them where the fakes (and
    torch.compile's stride checks) expect the contiguous ones."""
    if t is None:
        return None
    t = t.contiguous()
    strides, s = [], 1
    for n in reversed(t.shape):
        strides.append(s)
        s *= max(n, 1)
    strides = tuple(reversed(strides))
    return t if t.stride() == strides else t.as_strided(t.shape, strides)


# ---------------------------------------------------------------------------------------------------------------
# The custom ops
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("lit_mamba2::ssd_fwd", mutates_args=())
def ssd_fwd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Optional[Tensor],
            z: Optional[Tensor], dt_bias: Optional[Tensor], initial_states: Optional[Tensor],
            seq_idx: Optional[Tensor], dt_softplus: bool, dt_lo: float, dt_hi: float
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, final_states, entering states, processed dt, in-chunk cumsum, pre-gate y or empty)."""
    _check_inputs(x, chunk_size)
    x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx = map(
        _c, (x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx))
    b, L, H, P, G, N, NC, Lp = _sizes(x, B, chunk_size)
    cs = chunk_size
    f32 = torch.float32
    dtp = torch.empty(b, H, Lp, device=x.device, dtype=f32)
    cum = torch.empty(b, H, Lp, device=x.device, dtype=f32)
    states = torch.empty(b, NC, H, P, N, device=x.device, dtype=x.dtype)
    final = torch.empty(b, H, P, N, device=x.device, dtype=f32)
    has_limit = (dt_lo, dt_hi) != (0.0, INF)
    prec = _dot_prec(x.dtype)
    ddt_ = _dot_dtype(x.dtype)
    dummy = x
    _launch(_dt_kernel, (NC, b * H), dt, A, dt_bias if dt_bias is not None else dummy, dtp, cum,
            L, H, NC, float(dt_lo), float(min(dt_hi, 3.0e38)),
            CS=cs, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_LIMIT=has_limit, num_warps=4)
    BP1, BN1, segc, nseg = _fwd_state_plan(b, H, P, N, NC)
    npb, nnb = triton.cdiv(P, BP1), triton.cdiv(N, BN1)
    state_args = (x, B, initial_states if initial_states is not None else dummy,
                  seq_idx if seq_idx is not None else dummy, dtp, cum, states, final)
    # 256 positions of float32 x and B in two pipeline stages would need 256 KB of shared memory (H100: 227 KB)
    BK1 = min(cs, CONFIG["fwd_state_bk"] or CONFIG["state_bk"], 128 if x.element_size() == 4 else 256)
    state_kw = dict(CS=cs, BK=BK1, BP=BP1, BN=BN1,
                    HAS_INIT=initial_states is not None, HAS_SEQ=seq_idx is not None, DOT_PREC=prec, DT=ddt_,
                    num_warps=4, num_stages=CONFIG["fwd_state_stages"] or _stages(BP1, _pow2(N)),
                    **_maxnreg("state_maxnreg"))
    if nseg == 1:
        _launch(_fwd_state_kernel, (npb * nnb, b * H, 1), *state_args, dummy, dummy, dummy, L, H, G, P, N, NC, nnb,
                NC, TWO_LEVEL=False, **state_kw)
    else:
        # two-level pass: segments (the first from the initial state, the others from zero) in parallel storing
        # their chunks' entering states, the segments chained by one scan, then each later chunk's entering state
        # gets its segment's true entering state decayed to it, elementwise
        seg = torch.empty(b, H, nseg, P, N, device=x.device, dtype=f32)
        segdec = torch.empty(b, H, nseg, device=x.device, dtype=f32)
        tot = torch.empty(b, H, NC, device=x.device, dtype=f32)
        _launch(_fwd_state_kernel, (npb * nnb, b * H, nseg), *state_args, seg, segdec, tot, L, H, G, P, N, NC, nnb,
                segc, TWO_LEVEL=True, **state_kw)
        segp = _pow2(nseg, 2)
        seg_block = min(_pow2(P * N), max(16, 4096 // segp))  # all segments of the block in registers: ~4096 values
        _launch(_fwd_seg_kernel, (triton.cdiv(P * N, seg_block), b * H), seg, segdec, final, P * N, nseg,
                BLOCK=seg_block, SEGP=segp, num_warps=4)
        fix_block = min(_pow2(P * N), 4096)
        _launch(_fwd_fix_kernel, (triton.cdiv(P * N, fix_block), NC - segc, b * H), states, seg, tot, H, P * N, NC,
                nseg, segc, BLOCK=fix_block, num_warps=4)
    out = torch.empty_like(x)
    ypre = torch.empty_like(x) if z is not None else x.new_empty(0)
    BP, BN = _pow2(P), _pow2(N)
    BM = _bm(cs, "out_bm", BP, BN)
    BK = min(BM, CONFIG["out_bk"] or BM)
    use_cb = _use_cb(H, G, N, CONFIG["out_cb_min_dstate"])
    # C·B in bf16 for bf16 inputs (half the output kernel's largest L2 read; v7-fwd a), else float32 (float16's
    # range could not hold C·B at large dstate)
    cb = _cb(B, C, cs, NC, prec, ddt_, causal_upto=BM if CONFIG["cb_causal"] else 0,
             dtype=torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32) if use_cb else None
    out_args = (x, B, C, D if D is not None else dummy, z if z is not None else dummy,
                seq_idx if seq_idx is not None else dummy,
                dtp, cum, states, cb if use_cb else dummy, out, ypre if z is not None else dummy, L, H, G, P, N, NC)
    out_kw = dict(CS=cs, BM=BM, BK=BK, BP=BP, BN=BN, HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2,
                  HAS_Z=z is not None, HAS_SEQ=seq_idx is not None, USE_CB=use_cb,
                  FOLD=_fold(N, seq_idx, "out_fold_decay"), DOT_PREC=prec, DT=ddt_,
                  num_warps=_warps(BN, "out_warps"), num_stages=CONFIG["out_stages"] or _stages(BP, BN),
                  **_maxnreg("out_maxnreg", 128 if BP <= 64 and BM == 64 and (BN <= 64 or BN == 128 and BK == 64)
                             else None))
    _launch(_fwd_out_kernel, (H, NC * (cs // BM), b), *out_args, **out_kw)
    return out, final, states, dtp, cum, ypre


@ssd_fwd.register_fake
def _(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_lo, dt_hi):
    b, L, H, P, _, N, NC, Lp = _sizes(x, B, chunk_size)
    f32 = torch.float32
    # every output is allocated contiguous (the inputs are made contiguous first): torch.empty_like(x) would keep a
    # dense but permuted x's strides
    return (x.new_empty(x.shape), x.new_empty(b, H, P, N, dtype=f32), x.new_empty(b, NC, H, P, N),
            x.new_empty(b, H, Lp, dtype=f32), x.new_empty(b, H, Lp, dtype=f32),
            x.new_empty(x.shape) if z is not None else x.new_empty(0))


@torch.library.custom_op("lit_mamba2::ssd_bwd", mutates_args=())
def ssd_bwd(dout: Tensor, dfinal: Optional[Tensor], x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
            chunk_size: int, D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
            initial_states: Optional[Tensor], seq_idx: Optional[Tensor], dt_softplus: bool, dt_lo: float,
            dt_hi: float, states: Tensor, dtp: Tensor, cum: Tensor, ypre: Tensor
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states); empty tensors for absent inputs."""
    dout, dfinal, x, dt, A, B, C, D, z, dt_bias, seq_idx, ypre = map(
        _c, (dout, dfinal, x, dt, A, B, C, D, z, dt_bias, seq_idx, ypre))
    b, L, H, P, G, N, NC, Lp = _sizes(x, B, chunk_size)
    cs = chunk_size
    f32 = torch.float32
    dev = x.device
    prec = _dot_prec(x.dtype)
    ddt_ = _dot_dtype(x.dtype)
    has_limit = (dt_lo, dt_hi) != (0.0, INF)
    if z is not None:  # out = y * silu(z): the kernels take dy, the gradient of y
        zf = z.float()
        sz = torch.sigmoid(zf)
        doutf = dout.float()
        dz = (doutf * ypre.float() * sz * (1 + zf * (1 - sz))).to(z.dtype)
        dy = (doutf * zf * sz).to(x.dtype)
    else:
        dz = x.new_empty(0)
        dy = dout
    dummy = x
    # 1. reverse state pass
    nseg, seg_len = _bwd_state_segments(b, H, P, N, NC)
    if nseg > 1:  # two-level: the segments' walks give the parallelism, the headdim blocks stay whole
        BN1 = min(_pow2(N), CONFIG["bwd_state_bn"] or CONFIG["state_bn"])
        BP1 = min(_pow2(P), 64)
    else:
        BP1, BN1 = _state_blocks(b, H, P, N, "bwd_state_bn")
    npb, nnb = triton.cdiv(P, BP1), triton.cdiv(N, BN1)
    dstates = torch.empty_like(states)
    dinit = torch.empty(b, H, P, N, device=dev, dtype=f32)
    dcl_rows = bool(CONFIG["bwd_state_dcl_rows"])
    ndcl = npb * nnb * (BP1 if dcl_rows else 1)  # d cum_last partials per chunk
    dcl = torch.empty(b, H, NC, ndcl, device=dev, dtype=f32)
    two_level = nseg > 1
    segbuf = torch.empty(b, H, nseg, P, N, device=dev, dtype=f32) if two_level else dummy
    segdec = torch.empty(b, H, nseg, device=dev, dtype=f32) if two_level else dummy
    tot = torch.empty(b, H, NC, device=dev, dtype=f32) if two_level else dummy
    totd = torch.empty(b, H, NC, device=dev, dtype=f32) if two_level else dummy
    _launch(_bwd_state_kernel, (npb * nnb, b * H, nseg), dy, C, seq_idx if seq_idx is not None else dummy, cum,
            states, dfinal if dfinal is not None else dummy, dstates, dinit, dcl, segbuf, segdec, tot, totd,
            L, H, G, P, N, NC, nnb, seg_len,
            CS=cs, BK=min(cs, CONFIG["bwd_state_bk"] or CONFIG["state_bk"]), BP=BP1, BN=BN1,
            HAS_DFINAL=dfinal is not None, HAS_SEQ=seq_idx is not None, TWO_LEVEL=two_level, DCL_ROWS=dcl_rows,
            DOT_PREC=prec, DT=ddt_, num_warps=_bwd_state_warps(),
            num_stages=_stages(BP1, _pow2(N), "bwd_state_stages"),
            **_maxnreg("bwd_state_maxnreg"))
    # 2. dCB per group and tile pair (heads summed; each head's quadratic d cum by tile), storing C·B^T for dx.
    # It reads no state, so after a two-level walk it runs on a side stream beside the scan and the fix-up
    # (bandwidth-bound, light programs that fit beside dCB's): the GPU time of the pair is about dCB's alone.
    # Its buffers are allocated here, on the current stream, which waits for the side stream before any reader.
    BP, BN = _pow2(P), _pow2(N)
    BM = _bm(cs, "bwd_bm", BP, BN)
    NM = cs // BM
    cb_t = bool(CONFIG["bwd_cbt"])
    use_cb = _use_cb(H, G, N) and not cb_t
    if cb_t:  # filled by the dCB kernel before dx reads it
        cb = torch.empty(b, NC, G, cs, cs, device=dev, dtype=x.dtype if x.dtype != f32 else f32)
    else:
        cb = _cb(B, C, cs, NC, prec, ddt_) if use_cb else dummy
    dcb = torch.empty(b, NC, G, cs, cs, device=dev, dtype=x.dtype if x.dtype == torch.bfloat16 else f32)
    part = torch.empty(b, H, 2 * NM, Lp, device=dev, dtype=f32)
    side = _side_stream(x) if two_level and CONFIG["bwd_overlap"] else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        _launch(_bwd_dcb_kernel, (NC * (NM * (NM + 1) // 2), b * G),
                x, B, C, dy, seq_idx if seq_idx is not None else dummy, dtp, cum, dcb, part, cb, L, H, G, P, N, NC,
                CS=cs, BM=BM, BP=BP, BN=BN, HAS_SEQ=seq_idx is not None, STORE_CBT=cb_t, DOT_PREC=prec, DT=ddt_,
                num_warps=_warps(BN, "dcb_warps"), num_stages=_stages(BP, BN, "dcb_stages"),
                **_maxnreg("dcb_maxnreg"))
    if two_level:
        # the segments were walked in parallel (each from zero, the last from dfinal): one scan chains them (and gives
        # the initial state's gradient), then every chunk before the last segment gets its segment's exiting
        # gradient's share, elementwise
        segp = _pow2(nseg, 2)
        seg_block = min(_pow2(P * N), max(16, 4096 // segp))  # all segments of the block in registers: ~4096 values
        _launch(_bwd_seg_kernel, (triton.cdiv(P * N, seg_block), b * H), segbuf, segdec, dinit, P * N, nseg,
                BLOCK=seg_block, SEGP=segp, num_warps=4)
        _launch(_bwd_fix_kernel, ((nseg - 1) * seg_len * npb * nnb, b * H), dstates, states, segbuf, tot, totd, dcl,
                H, P, N, NC, nseg, seg_len, npb * nnb, nnb, BP=BP1, BN=BN1, DCL_ROWS=dcl_rows, num_warps=4)
    if side is not None:  # everything after reads dCB's outputs
        torch.cuda.current_stream(x.device).wait_stream(side)
    # 3. dx per head and block of source positions (one dot per tile), ddt's direct part, the state's d cum
    dx = torch.empty_like(x)
    ddt_direct = torch.empty(b, H, Lp, device=dev, dtype=f32)
    dcum_a = torch.empty(b, H, Lp, device=dev, dtype=f32)
    vbuf = torch.empty(b, H, Lp, device=dev, dtype=f32)
    dD_part = torch.empty(b, NC * NM, H, P, device=dev, dtype=f32) if D is not None else x.new_empty(0)
    heads_fast = CONFIG["dx_heads_fastest"]
    if heads_fast is None:  # heads together once a batch row's C·Bᵀ no longer stays in L2 between heads
        heads_fast = NC * cs * cs * G * dcb.element_size() >= CONFIG["dx_heads_fastest_bytes"]
    heads_fast = bool(heads_fast) and NC * NM < 65536  # the grid's second axis is 16-bit
    _launch(_bwd_dx_kernel, (b * H, NC * NM) if heads_fast else (NC * NM, b * H),
            x, B, C, D if D is not None else dummy, dy, seq_idx if seq_idx is not None else dummy, dtp, cum,
            dstates, cb, dx, ddt_direct, dcum_a, vbuf, dD_part if D is not None else dummy, L, H, G, P, N, NC,
            CS=cs, BM=BM, BP=BP, BN=BN, HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2,
            HAS_SEQ=seq_idx is not None, USE_CB=use_cb, CB_T=cb_t, FOLD=_fold(N, seq_idx), HEADS_FASTEST=heads_fast,
            DOT_PREC=prec, DT=ddt_, num_warps=_warps(BN, "dx_warps"), num_stages=_stages(BP, BN, "dx_stages"),
            **_maxnreg("dx_maxnreg", 168 if BN <= 64 or (BN <= 128 and cs <= 128) else None))
    # 4. dB and dC per group from dCB, with the state terms head by head
    dB = torch.empty_like(B)
    dC = torch.empty_like(C)
    dcum_b = torch.empty(b, H, Lp, device=dev, dtype=f32)
    bc_args = (x, B, C, dy, seq_idx if seq_idx is not None else dummy, dtp, cum, states, dstates, dcb,
               dB, dC, dcum_b, L, H, G, P, N, NC)
    bc_kw = dict(CS=cs, BM=BM, BP=BP, BN=BN, HAS_SEQ=seq_idx is not None, DOT_PREC=prec, DT=ddt_,
                 num_warps=_warps(BN, "bc_warps"), num_stages=_stages(BP, BN, "bc_stages"),
                 **_maxnreg("bc_maxnreg", 128 if BN <= 128 else None))
    _launch(_bwd_bc_kernel, (NC * NM, b * G), *bc_args, DO_DC=True, **bc_kw)
    _launch(_bwd_bc_kernel, (NC * NM, b * G), *bc_args, DO_DC=False, **bc_kw)
    # 5. d cum -> d dt, dA, d dt_bias
    ddt = torch.empty_like(dt)
    dA_part = torch.empty(b, NC, H, device=dev, dtype=f32)
    dbias_part = torch.empty(b, NC, H, device=dev, dtype=f32) if dt_bias is not None else x.new_empty(0)
    _launch(_bwd_dt_kernel, (NC, b * H),
        dt, dt_bias if dt_bias is not None else dummy, A, dtp, ddt_direct, dcum_a, dcum_b, vbuf, dcl, part,
        ddt, dA_part, dbias_part if dt_bias is not None else dummy,
        L, H, NC, ndcl, float(dt_lo), float(min(dt_hi, 3.0e38)),
        CS=cs, BPN=_pow2(ndcl, 2), PART_BM=BM, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus), HAS_LIMIT=has_limit, num_warps=4)
    dA = sum_partials(dA_part, A.dtype)
    ddt_bias = sum_partials(dbias_part, dt_bias.dtype) if dt_bias is not None else x.new_empty(0)
    if D is not None:
        dD_part = dD_part.view(-1, H * P)
        dD = (sum_partials(dD_part, D.dtype).view(H, P) if D.dim() == 2
              else sum_partials(dD_part, torch.float32).view(H, P).sum(-1).to(D.dtype))
    else:
        dD = x.new_empty(0)
    dinit_out = dinit.to(initial_states.dtype) if initial_states is not None else x.new_empty(0)
    return dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit_out


@ssd_bwd.register_fake
def _(dout, dfinal, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_lo, dt_hi,
      states, dtp, cum, ypre):
    # the real gradients are contiguous whatever the inputs' layouts (torch.empty_like would keep dense strides), and
    # an absent input's is a fresh empty tensor (one shared by several outputs would alias them)
    def like(t):
        return t.new_empty(t.shape) if t is not None else x.new_empty(0)

    return tuple(map(like, (x, dt, A, B, C, D, z, dt_bias, initial_states)))


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_lo, dt_hi = inputs
    _, _, states, dtp, cum, ypre = output
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, states, dtp, cum, ypre)
    ctx.args = (chunk_size, dt_softplus, dt_lo, dt_hi)
    # unused outputs (the final states, and the saved states/dt/cumsum, never differentiated) get None, not zero
    # tensors filled on every backward (the entering states alone: 134 MB at 65,536 tokens, dstate 128)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dfinal, *unused):
    x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, states, dtp, cum, ypre = ctx.saved_tensors
    chunk_size, dt_softplus, dt_lo, dt_hi = ctx.args
    if dout is None:
        dout = torch.zeros_like(x)
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = torch.ops.lit_mamba2.ssd_bwd(
        dout, dfinal, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_lo, dt_hi,
        states, dtp, cum, ypre)
    return (dx, ddt, dA, dB, dC, None, dD if D is not None else None, dz if z is not None else None,
            ddt_bias if dt_bias is not None else None, dinit if initial_states is not None else None,
            None, None, None, None)


ssd_fwd.register_autograd(_backward, setup_context=_setup_context)


def ssd(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
        dt_softplus=False, dt_limit=(0.0, INF), return_final_states=False):
    """`lit_mamba2.ssd` on the Triton kernels (arguments already checked by `lit_mamba2.ops.ssd`)."""
    # chunk_size only decides how the work is cut (any value gives the same function): the kernels take a power
    # of two from 16 to 256, so use the largest one within the asked size and max_chunk (16 at the least)
    chunk_size = int(chunk_size)
    if CONFIG["max_chunk"]:
        chunk_size = min(chunk_size, CONFIG["max_chunk"])
    chunk_size = max(16, 1 << (min(chunk_size, 256).bit_length() - 1))
    out, final, *_ = torch.ops.lit_mamba2.ssd_fwd(
        x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, bool(dt_softplus),
        float(dt_limit[0]), float(dt_limit[1]))
    return (out, final) if return_final_states else out
