"""Depthwise causal conv1d (width 1-4) with optional SiLU, in Triton: forward and backward.

Positions are counted in the "padded" sequence xp = [initial_states, x] of length width - 1 + seqlen, so that the
initial state, the body and the final state are one indexing scheme: out[t] reads xp[t : t + width], the final
state is xp[seqlen : seqlen + width - 1], and the initial-state slots belong to the row's first document.

The backward is two passes. The first, over outputs t, recomputes the pre-activation y[t] from x (as the
forward) and stores g[t] = dy[t] silu'(y[t]) in float32, with the weight and bias gradients' per-program partial
sums; the second, over padded positions p, gathers dxp[p] = Σ_k w[k] g[p - k] (same document only). The gradient
of the initial state is dxp[:width - 1]. The partial sums are added in a fixed order (deterministic).
"""

import torch
import triton
import triton.language as tl

from .partial_sums import sum_partials


@triton.jit
def _row(ptr, b, sb):
    """ptr at batch row (or partial) b, the offset in int64 (see _base)."""
    return ptr + b.to(tl.int64) * sb


@triton.jit
def _base(ptr, b, r0, sb, sr):
    """ptr at batch row b, row r0: in int64, since b * batch stride or a position times the row stride passes 2**31
    at long sequences (1M tokens x in_proj's 10,576 channels at 2.7b) or large batches; a tile's own offsets from
    there stay int32."""
    return _row(ptr, b, sb) + r0.to(tl.int64) * sr


@triton.jit
def _load_xp(xb, ib, q, rel, d, mask, L, sxl, sxd, sid, sik, W: tl.constexpr, HAS_INIT: tl.constexpr):
    """xp[q, d] of one batch row for a tile of padded positions q (block rows) and channels d (block columns), in
    float32. xb: x at the row of padded position q - rel; ib: the row's initial state."""
    t = q - (W - 1)
    body = mask & (t >= 0) & (t < L)
    v = tl.load(xb + rel * sxl + d * sxd, mask=body, other=0.0).to(tl.float32)
    if HAS_INIT:
        head = mask & (t < 0) & (q >= 0)
        v += tl.load(ib + d * sid + q * sik, mask=head, other=0.0).to(tl.float32)
    return v


@triton.jit
def _doc_p(sb, q, L, ssl, W: tl.constexpr):
    """The document of padded position q (sb: the row's seq_idx): seq_idx at q - (W - 1), and the first document for
    initial-state slots."""
    t = tl.minimum(tl.maximum(q - (W - 1), 0), L - 1)
    return tl.load(sb + t * ssl)


@triton.jit
def _preactivation(x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, L, D, sxb, sxl, sxd, swd, swk, ssb, ssl, sib, sid, sik,
                   W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
                   BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """The output tile of program (batch row b, position block, channel block): its first position t0, positions
    t = t0 + r, channels d and mask, and the pre-activation y = bias + Σ_k w[k] xp[t + k] over the taps of t's own
    document, with the W taps' inputs as a tuple, taps[k] = xp[t + k] (for the weight gradient)."""
    b = tl.program_id(0)
    t0 = tl.program_id(1) * BLOCK_L
    r = tl.arange(0, BLOCK_L)
    t = t0 + r
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    tm, dm = t < L, d < D
    mask = tm[:, None] & dm[None, :]
    xb = _base(x_ptr, b, t0 - (W - 1), sxb, sxl)  # the x row of padded position t0
    ib = _row(init_ptr, b, sib)
    sb = _row(seq_ptr, b, ssb)
    if HAS_SEQ:
        doc_t = _doc_p(sb, t + (W - 1), L, ssl, W)
    y = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    taps = ()
    for k in tl.static_range(W):
        q = t + k
        keep = mask
        if HAS_SEQ:
            keep = keep & (_doc_p(sb, q, L, ssl, W) == doc_t)[:, None]
        xv = _load_xp(xb, ib, q[:, None], (r + k)[:, None], d[None, :], keep, L, sxl, sxd, sid, sik, W, HAS_INIT)
        y += xv * tl.load(w_ptr + d * swd + k * swk, mask=dm, other=0.0).to(tl.float32)[None, :]
        taps = taps + (xv,)
    return b, t0, r, d, dm, mask, y, taps


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, out_ptr,
                     L, D,
                     sxb, sxl, sxd, swd, swk, ssb, ssl, sib, sid, sik, sob, sol, sod,
                     W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
                     SILU: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    b, t0, r, d, dm, mask, acc, _ = _preactivation(
        x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, L, D, sxb, sxl, sxd, swd, swk, ssb, ssl, sib, sid, sik,
        W, HAS_BIAS, HAS_SEQ, HAS_INIT, BLOCK_L, BLOCK_D)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    ob = _base(out_ptr, b, t0, sob, sol)
    tl.store(ob + r[:, None] * sol + d[None, :] * sod, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_bwd_g_kernel(x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, dout_ptr, g_ptr, dw_part_ptr, db_part_ptr,
                       L, D,
                       sxb, sxl, sxd, swd, swk, ssb, ssl, sib, sid, sik, sgb, sgl, sgd, s_gb, s_gl,
                       W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
                       SILU: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """First pass of the two-pass backward, over output positions t: the pre-activation gradient
    g[t] = dy[t] silu'(y[t]) (y recomputed from the W taps, as the forward), stored in float32 (row strides s_gb,
    s_gl, channels contiguous), and the weight and bias gradients' partial sums of this tile (g[t] xp[t + k] over the
    taps k of t's own document)."""
    part = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    b, t0, r, d, dm, mask, y, taps = _preactivation(
        x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, L, D, sxb, sxl, sxd, swd, swk, ssb, ssl, sib, sid, sik,
        W, HAS_BIAS, HAS_SEQ, HAS_INIT, BLOCK_L, BLOCK_D)
    gb = _base(dout_ptr, b, t0, sgb, sgl)
    g = tl.load(gb + r[:, None] * sgl + d[None, :] * sgd, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        sig = tl.sigmoid(y)
        g = g * sig * (1.0 + y * (1.0 - sig))
    tl.store(_base(g_ptr, b, t0, s_gb, s_gl) + r[:, None] * s_gl + d[None, :], g, mask=mask)
    pb = _row(dw_part_ptr, part, W * D)
    for k in tl.static_range(W):
        tl.store(pb + k * D + d, tl.sum(g * taps[k], axis=0), mask=dm)
    if HAS_BIAS:
        tl.store(_row(db_part_ptr, part, D) + d, tl.sum(g, axis=0), mask=dm)


@triton.jit
def _conv_bwd_dx_kernel(w_ptr, seq_ptr, g_ptr, dfinal_ptr, dx_ptr, dinit_ptr,
                        L, D,
                        swd, swk, ssb, ssl, s_gb, s_gl, sfb, sfd, sfk, sdxb, sdxl, sdxd, sdib, sdid, sdik,
                        W: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr,
                        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Second pass, over padded positions p: dxp[p] = Σ_j w[j] g[p - j] over the outputs t = p - j of p's own
    document (+ the final state's gradient); dxp of the body is dx, of the first W - 1 positions the initial state's
    gradient."""
    b = tl.program_id(0)
    p0 = tl.program_id(1) * BLOCK_L
    r = tl.arange(0, BLOCK_L)
    p = p0 + r
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    pm = p < L + W - 1
    sb = _row(seq_ptr, b, ssb)
    if HAS_SEQ:
        doc = _doc_p(sb, p, L, ssl, W)
    gb = _base(g_ptr, b, p0, s_gb, s_gl)  # g's row of output position p0
    dxp = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(W):
        t = p - j
        keep = (t >= 0) & (t < L) & pm
        if HAS_SEQ:
            keep = keep & (_doc_p(sb, t + (W - 1), L, ssl, W) == doc)
        gv = tl.load(gb + (r - j)[:, None] * s_gl + d[None, :], mask=keep[:, None] & dm[None, :], other=0.0)
        dxp += gv * tl.load(w_ptr + d * swd + j * swk, mask=dm, other=0.0).to(tl.float32)[None, :]
    if HAS_DFINAL:
        i = p - L
        fkeep = (i >= 0) & pm
        if HAS_SEQ:
            fkeep = fkeep & (doc == _doc_p(sb, L + W - 2, L, ssl, W))
        dxp += tl.load(_row(dfinal_ptr, b, sfb) + d[None, :] * sfd + i[:, None] * sfk,
                       mask=fkeep[:, None] & dm[None, :], other=0.0).to(tl.float32)
    t = p - (W - 1)
    body = (t >= 0) & pm
    dxb = _base(dx_ptr, b, p0 - (W - 1), sdxb, sdxl)  # dx's row of padded position p0
    tl.store(dxb + r[:, None] * sdxl + d[None, :] * sdxd, dxp.to(dx_ptr.dtype.element_ty),
             mask=body[:, None] & dm[None, :])
    if HAS_INIT:
        head = (t < 0) & pm
        tl.store(_row(dinit_ptr, b, sdib) + d[None, :] * sdid + p[:, None] * sdik,
                 dxp.to(dinit_ptr.dtype.element_ty), mask=head[:, None] & dm[None, :])


# The backward's tiles (BLOCK_L, BLOCK_D, num_warps): its first pass (g) and its second (dx). H100 (sm_90): 64 x 64
# first-pass and 64 x 128 second-pass tiles of 4 warps, the fastest measured (fwd+bwd GPU ms at mamba2-130m /
# 2.7b shapes: 0.442 / 0.971, against 0.614 / 1.456 with (64, 128) first-pass tiles and 0.533 / 1.156 with
# (32, 128)). Two passes at all because one kernel that recomputed y at each of the W shifts from 2W - 1 shifted x
# tiles held in registers was register-bound (0.670 / 1.280); notes/small_kernels.md.
BWD_TILES = ((64, 64, 4), (64, 128, 4))


def _fwd_blocks(D):
    """(BLOCK_L, BLOCK_D) of the forward kernel."""
    return 64, min(128, triton.next_power_of_2(D))


def _state_dtype(x, weight):
    return torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32


def _final_states(x, weight, seq_idx, initial_states):
    """xp[:, L : L + W - 1] masked to the last document, as (batch, dim, W - 1), in the compute dtype (exact)."""
    b, L, D = x.shape
    W = weight.shape[1]
    cdt = _state_dtype(x, weight)
    prev = initial_states.transpose(1, 2).to(cdt) if initial_states is not None else x.new_zeros(b, W - 1, D, dtype=cdt)
    # [prev (W - 1 rows), the last min(L, W - 1) rows of x]: its last W - 1 rows are the final state
    tail = torch.cat([prev, x[:, max(0, L - (W - 1)):].to(cdt)], dim=1)[:, min(L, W - 1):]
    if seq_idx is not None and W > 1:
        doc = torch.cat([seq_idx[:, :1].expand(b, W - 1), seq_idx], dim=1)[:, -(W - 1):]
        tail = tail * (doc == seq_idx[:, -1:])[..., None].to(tail.dtype)
    return tail.transpose(1, 2).contiguous()


@torch.library.custom_op("lit_mamba2::causal_conv1d_fwd", mutates_args=())
def _conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seq_idx: torch.Tensor | None,
              initial_states: torch.Tensor | None, silu: bool, final: bool) -> tuple[torch.Tensor, torch.Tensor]:
    b, L, D = x.shape
    W = weight.shape[1]
    out = torch.empty(b, L, D, device=x.device, dtype=x.dtype)
    BL, BD = _fwd_blocks(D)
    init = initial_states if initial_states is not None else x
    seq = seq_idx if seq_idx is not None else x
    grid = (b, triton.cdiv(L, BL), triton.cdiv(D, BD))
    _conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, seq, init, out, L, D,
        x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1),
        seq.stride(0) if seq_idx is not None else 0, seq.stride(1) if seq_idx is not None else 0,
        *(initial_states.stride() if initial_states is not None else (0, 0, 0)),
        out.stride(0), out.stride(1), out.stride(2),
        W=W, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, HAS_INIT=initial_states is not None,
        SILU=silu, BLOCK_L=BL, BLOCK_D=BD, num_warps=4)
    if not final:
        return out, x.new_empty(0, dtype=_state_dtype(x, weight))
    return out, _final_states(x, weight, seq_idx, initial_states)


@_conv_fwd.register_fake
def _(x, weight, bias, seq_idx, initial_states, silu, final):
    b, L, D = x.shape
    shape = (b, D, weight.shape[1] - 1) if final else (0,)
    return x.new_empty(b, L, D), x.new_empty(shape, dtype=_state_dtype(x, weight))


@torch.library.custom_op("lit_mamba2::causal_conv1d_bwd", mutates_args=())
def _conv_bwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seq_idx: torch.Tensor | None,
              initial_states: torch.Tensor | None, dout: torch.Tensor, dfinal: torch.Tensor | None,
              silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, L, D = x.shape
    W = weight.shape[1]
    (BL, BD, nw), (BL2, BD2, nw2) = BWD_TILES
    BD, BD2 = min(BD, triton.next_power_of_2(D)), min(BD2, triton.next_power_of_2(D))
    nl = triton.cdiv(L, BL)
    g = torch.empty(b, L, D, device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    dw_part = torch.empty(b, nl, W, D, device=x.device, dtype=torch.float32)
    db_part = torch.empty(b, nl, D, device=x.device, dtype=torch.float32) if bias is not None else dw_part
    init = initial_states if initial_states is not None else x
    seq = seq_idx if seq_idx is not None else x
    ss = seq_idx.stride() if seq_idx is not None else (0, 0)
    _conv_bwd_g_kernel[(b, nl, triton.cdiv(D, BD))](
        x, weight, bias if bias is not None else weight, seq, init, dout, g, dw_part, db_part, L, D,
        x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1), *ss,
        *(initial_states.stride() if initial_states is not None else (0, 0, 0)),
        dout.stride(0), dout.stride(1), dout.stride(2), g.stride(0), g.stride(1),
        W=W, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, HAS_INIT=initial_states is not None,
        SILU=silu, BLOCK_L=BL, BLOCK_D=BD, num_warps=nw)
    dx = torch.empty(b, L, D, device=x.device, dtype=x.dtype)
    dinit = (torch.empty(b, D, W - 1, device=x.device, dtype=initial_states.dtype) if initial_states is not None
             else x.new_empty(0))
    _conv_bwd_dx_kernel[(b, triton.cdiv(L + W - 1, BL2), triton.cdiv(D, BD2))](
        weight, seq, g, dfinal if dfinal is not None else x, dx, dinit if initial_states is not None else dx, L, D,
        weight.stride(0), weight.stride(1), *ss, g.stride(0), g.stride(1),
        *(dfinal.stride() if dfinal is not None else (0, 0, 0)),
        dx.stride(0), dx.stride(1), dx.stride(2), *(dinit.stride() if initial_states is not None else (0, 0, 0)),
        W=W, HAS_SEQ=seq_idx is not None, HAS_INIT=initial_states is not None, HAS_DFINAL=dfinal is not None,
        BLOCK_L=BL2, BLOCK_D=BD2, num_warps=nw2)
    dw = sum_partials(dw_part.view(-1, W * D), weight.dtype).view(W, D).t()
    db = sum_partials(db_part, bias.dtype) if bias is not None else weight.new_empty(0)
    return dx, dw, db, dinit


@_conv_bwd.register_fake
def _(x, weight, bias, seq_idx, initial_states, dout, dfinal, silu):
    b, L, D = x.shape
    W = weight.shape[1]
    # dw is the (W, D) sum of the partials, transposed: strides (1, D), not contiguous. The partials' (part, W, D)
    # layout keeps the first pass's stores coalesced, and a contiguous copy would cost a launch: the fake says so.
    return (x.new_empty(b, L, D), weight.new_empty_strided((D, W), (1, D)),
            bias.new_empty(D) if bias is not None else weight.new_empty(0),
            initial_states.new_empty(b, D, W - 1) if initial_states is not None else x.new_empty(0))


def _setup(ctx, inputs, output):
    x, weight, bias, seq_idx, initial_states, silu, final = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx, initial_states)
    ctx.silu, ctx.final = silu, final


def _backward(ctx, dout, dfinal):
    x, weight, bias, seq_idx, initial_states = ctx.saved_tensors
    dx, dw, db, dinit = _conv_bwd(x, weight, bias, seq_idx, initial_states, dout,
                                  dfinal if ctx.final else None, ctx.silu)
    return (dx, dw, db if bias is not None else None, None, dinit if initial_states is not None else None, None,
            None)


_conv_fwd.register_autograd(_backward, setup_context=_setup)


def causal_conv1d(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                  activation="silu"):
    """`lit_mamba2.reference.causal_conv1d`'s semantics (arguments already checked by `lit_mamba2.ops`)."""
    if not 1 <= weight.shape[1] <= 4:  # the backward holds the taps' tiles in registers, sized for four
        raise ValueError(f"lit_mamba2.kernels.conv1d: width must be 1-4, got {weight.shape[1]}")
    out, final = _conv_fwd(x, weight, bias, seq_idx, initial_states, activation == "silu", bool(return_final_states))
    return (out, final) if return_final_states else out
