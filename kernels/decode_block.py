"""Everything between two Mamba-2 state updates of a batched decode step, in one persistent kernel.

At batch 64 a layer's decode step is the state update (a bandwidth-bound stream of the layer's SSM state) plus a
chain of small dependent kernels: out_proj, the residual add + RMSNorm, in_proj and the conv. Each of those costs
2-5 µs of latency however little it computes (decode run 11: 16.6 µs of the 35 per layer are the state stream, the
rest is the chain). Here that chain is one launch of `linear_block`, whose programs (one per SM, all resident)
walk three phases separated by grid-wide barriers (a counter in global memory, ~1 µs each) instead of kernel
boundaries:

  1. out_proj, split over K: each tile is one dot of the batch's (rows, BLOCK_K) slice of the state kernel's
     gated output u with a (BLOCK_K, BLOCK_N) weight tile, stored as float32 partials;
  2. per row: the partials summed in a fixed order and rounded as out_proj's output, scaled by the folded gated
     norm's rstd (the state kernel's partial sums of squares, kernels/state_update.py), added to the residual, and
     the next block's RMSNorm;
  3. in_proj of the next layer, one (BLOCK_N columns, all of K) tile per program turn, with the conv step (+ SiLU,
     the conv state shifted in place by the program that owns the channels) applied to the x, B, C columns.

Then the next layer's state update (kernels/state_update.py) reads z, conv(x, B, C) and dt. The first layer's
entry (embedding + RMSNorm + in_proj + conv: phases 2 and 3 with a plain hidden input) and the last layer's exit
(phases 1 and 2 with the final norm, before the LM head) are launches of the same kernel. No atomics touch the
data: every sum has a fixed order, so the same inputs give the same outputs bit for bit.

The barrier needs every program resident at once: the grid is at most one program per SM, and the kernel lets
the next kernel launch (PDL) only after its first barrier, when all of its programs are resident. Under
TRITON_INTERPRET (programs run one after another) each phase is its own launch instead (PHASES), so the CPU tests
run the same phase code without the barrier.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .pdl import options as pdl_options

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_ROWS = 64
# (BLOCK_N, BLOCK_K) of phase 1 (out_proj, split over K) and phase 3 (in_proj, BLOCK_K the inner loop's step)
OUT_TILE = (64, 256)
IN_TILE = (16, 128)
IN_STAGES = 3  # software pipelining of phase 3's loop over K
NUM_WARPS = 8
PROGRAMS = None  # None: one per SM
_BARRIER_STEP = 1 << 40  # each barrier adds exactly this to the counter, so its bit 40 flips once per barrier


@triton.jit
def _grid_barrier(bar_ptr, n_programs):
    """All programs of the grid meet here. Program 0 adds 2**40 - (n - 1), the others 1, so each barrier adds
    exactly 2**40 to the counter and flips its bit 40; a program waits until that bit differs from the value it
    saw on arrival. Self-resetting: the counter is never cleared, and it starts at 0."""
    tl.debug_barrier()  # the whole program's stores are issued before its arrival (release below)
    step = tl.full([], 1099511627776, tl.int64)  # 2**40
    inc = tl.where(tl.program_id(0) == 0, step - (n_programs - 1), 1).to(tl.int64)
    seen = tl.atomic_add(bar_ptr, inc, sem="acq_rel", scope="gpu")
    now = seen
    while ((now ^ seen) & step) == 0:  # plain volatile loads while waiting: no read-modify-write traffic
        now = tl.load(bar_ptr, volatile=True)
    tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")  # orders this program's later reads after the others' writes
    tl.debug_barrier()


@triton.jit
def _dot(a, b, DOT_DTYPE: tl.constexpr):
    if DOT_DTYPE == tl.float32:  # float32 models: exact float32 products, not TF32
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision="ieee")
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))


@triton.jit
def _weight_tile(w_ptr, t, n_blocks, N, K, w_n, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tile t of a product split over K: its columns, split index, and the (BLOCK_K, BLOCK_N) weight tile."""
    offs_n = (t % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = t // n_blocks
    offs_k = ks * BLOCK_K + tl.arange(0, BLOCK_K)
    w = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * w_n + offs_k[:, None],
                mask=(offs_k < K)[:, None] & (offs_n < N)[None, :], other=0.0)
    return offs_n, ks, offs_k, w


@triton.jit
def _out_proj_phase(u_ptr, wo_ptr, part_ptr, M, N, K, u_m, wo_n, p_s, p_m,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    USE_PDL: tl.constexpr):
    """The PDL wait happens in here: the program's first weight tile (a parameter) loads before it."""
    n_blocks = tl.cdiv(N, BLOCK_N)
    n_tiles = n_blocks * tl.cdiv(K, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mm = offs_m < M
    offs_n, ks, offs_k, w = _weight_tile(wo_ptr, tl.program_id(0), n_blocks, N, K, wo_n, BLOCK_N, BLOCK_K)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    for t in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        if t != tl.program_id(0):
            offs_n, ks, offs_k, w = _weight_tile(wo_ptr, t, n_blocks, N, K, wo_n, BLOCK_N, BLOCK_K)
        u = tl.load(u_ptr + offs_m[:, None] * u_m + offs_k[None, :], mask=mm[:, None] & (offs_k < K)[None, :],
                    other=0.0)
        acc = _dot(u, w, DOT_DTYPE)
        tl.store(part_ptr + ks * p_s + offs_m[:, None] * p_m + offs_n[None, :], acc,
                 mask=mm[:, None] & (offs_n < N)[None, :])


@triton.jit
def _add_norm_phase(h_ptr, part_ptr, ss_ptr, r_ptr, nw_ptr, x_ptr, M, D, n_ss, inv_h_dim, h_eps, eps,
                    h_m, p_s, p_m, ss_m, r_m, x_m,
                    FROM_PARTS: tl.constexpr, N_SPLIT: tl.constexpr, HAS_RMS: tl.constexpr,
                    HAS_RESIDUAL: tl.constexpr, H_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SS: tl.constexpr):
    offs = tl.arange(0, BLOCK_D)
    m = offs < D
    w = tl.load(nw_ptr + offs, mask=m, other=0.0).to(tl.float32)
    for b in range(tl.program_id(0), M, tl.num_programs(0)):
        if FROM_PARTS:
            h = tl.zeros([BLOCK_D], dtype=tl.float32)
            for s in tl.static_range(N_SPLIT):  # fixed order: deterministic; unrolled, so the loads go out together
                h += tl.load(part_ptr + s * p_s + b * p_m + offs, mask=m, other=0.0)
            h = h.to(H_DTYPE).to(tl.float32)  # out_proj's output as the unfused path stores it
        else:
            h = tl.load(h_ptr + b * h_m + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_RMS:  # the folded gated norm's scale from the state kernel's partial sums of squares
            po = tl.arange(0, BLOCK_SS)
            ss = tl.load(ss_ptr + b * ss_m + po, mask=po < n_ss, other=0.0)
            h = h * (1.0 / tl.sqrt(tl.sum(ss, axis=0) * inv_h_dim + h_eps))
        if HAS_RESIDUAL:
            h += tl.load(r_ptr + b * r_m + offs, mask=m, other=0.0).to(tl.float32)
        h = h.to(r_ptr.dtype.element_ty)  # the residual in its own dtype (each row owned by one program)
        tl.store(r_ptr + b * r_m + offs, h, mask=m)
        h = h.to(nw_ptr.dtype.element_ty).to(tl.float32)  # RMSNorm reads the residual in its weight's dtype
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)
        tl.store(x_ptr + b * x_m + offs, (h * rstd * w).to(x_ptr.dtype.element_ty), mask=m)


@triton.jit
def _in_proj_conv_phase(x_ptr, wi_ptr, out_ptr, cs_ptr, cw_ptr, cb_ptr, M, N, K, c_lo, c_hi,
                        x_m, wi_n, o_m, cs_b, cs_c, cs_w, cw_c, cw_w,
                        WIDTH: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IN_STAGES: tl.constexpr,
                        DOT_DTYPE: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    mm = offs_m < M
    for t in range(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=IN_STAGES):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mk = offs_k < K
            w = tl.load(wi_ptr + offs_n[None, :].to(tl.int64) * wi_n + offs_k[:, None],
                        mask=mk[:, None] & mn[None, :], other=0.0)
            x = tl.load(x_ptr + offs_m[:, None] * x_m + offs_k[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
            acc += _dot(x, w, DOT_DTYPE)
        v = acc.to(out_ptr.dtype.element_ty)  # in_proj's output as the unfused path stores it
        # the conv step on the columns [c_lo, c_hi): this program owns them, so it shifts their conv state in place
        conv = mn & (offs_n >= c_lo) & (offs_n < c_hi)
        if tl.max(conv.to(tl.int32), axis=0) > 0:
            ch = tl.where(conv, offs_n - c_lo, 0)
            mc = mm[:, None] & conv[None, :]
            s_base = cs_ptr + offs_m[:, None] * cs_b + ch[None, :] * cs_c
            if HAS_CONV_BIAS:
                y = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32) + \
                    tl.load(cb_ptr + ch, mask=conv, other=0.0).to(tl.float32)[None, :]
            else:
                y = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k in tl.static_range(WIDTH - 1):
                prev = tl.load(s_base + k * cs_w, mask=mc, other=0.0)
                y += prev.to(tl.float32) * tl.load(cw_ptr + ch * cw_c + k * cw_w, mask=conv,
                                                   other=0.0).to(tl.float32)[None, :]
                if k > 0:
                    tl.store(s_base + (k - 1) * cs_w, prev, mask=mc)  # slot k - 1 was already read
            y += v.to(tl.float32) * tl.load(cw_ptr + ch * cw_c + (WIDTH - 1) * cw_w, mask=conv,
                                            other=0.0).to(tl.float32)[None, :]
            tl.store(s_base + (WIDTH - 2) * cs_w, v.to(cs_ptr.dtype.element_ty), mask=mc)
            y = y * tl.sigmoid(y)
            v = tl.where(conv[None, :], y.to(out_ptr.dtype.element_ty), v)
        tl.store(out_ptr + offs_m[:, None] * o_m + offs_n[None, :], v, mask=mm[:, None] & mn[None, :])


@triton.jit
def _linear_block_kernel(
    u_ptr, wo_ptr, part_ptr, h_ptr, ss_ptr, r_ptr, nw_ptr, x_ptr, wi_ptr, out_ptr, cs_ptr, cw_ptr, cb_ptr, bar_ptr,
    M, D, K_OUT, N_IN, n_ss, inv_h_dim, h_eps, eps, c_lo, c_hi,
    u_m, wo_n, p_s, p_m, h_m, ss_m, r_m, x_m, wi_n, o_m, cs_b, cs_c, cs_w, cw_c, cw_w,
    PHASES: tl.constexpr, FROM_PARTS: tl.constexpr, N_SPLIT: tl.constexpr, HAS_RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, H_DTYPE: tl.constexpr,
    WIDTH: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SS: tl.constexpr, OUT_N: tl.constexpr, OUT_K: tl.constexpr, IN_N: tl.constexpr, IN_K: tl.constexpr,
    IN_STAGES: tl.constexpr, DOT_DTYPE: tl.constexpr, BARRIERS: tl.constexpr, USE_PDL: tl.constexpr,
):
    # PHASES: bit 1 out_proj, bit 2 add + norm, bit 4 in_proj + conv. Only parameters load before the PDL wait.
    if PHASES & 1:
        _out_proj_phase(u_ptr, wo_ptr, part_ptr, M, D, K_OUT, u_m, wo_n, p_s, p_m, BLOCK_M, OUT_N, OUT_K, DOT_DTYPE,
                        USE_PDL)
    elif USE_PDL:
        tl.extra.cuda.gdc_wait()
    if BARRIERS:
        _grid_barrier(bar_ptr, tl.num_programs(0))
    if USE_PDL:  # every program is resident now: the next kernel's programs may take the free slots
        tl.extra.cuda.gdc_launch_dependents()
    if PHASES & 2:
        _add_norm_phase(h_ptr, part_ptr, ss_ptr, r_ptr, nw_ptr, x_ptr, M, D, n_ss, inv_h_dim, h_eps, eps,
                        h_m, p_s, p_m, ss_m, r_m, x_m, FROM_PARTS, N_SPLIT, HAS_RMS, HAS_RESIDUAL, H_DTYPE, BLOCK_D,
                        BLOCK_SS)
    if PHASES & 4:
        if BARRIERS:
            _grid_barrier(bar_ptr, tl.num_programs(0))
        _in_proj_conv_phase(x_ptr, wi_ptr, out_ptr, cs_ptr, cw_ptr, cb_ptr, M, N_IN, D, c_lo, c_hi, x_m, wi_n, o_m,
                            cs_b, cs_c, cs_w, cw_c, cw_w, WIDTH, HAS_CONV_BIAS, BLOCK_M, IN_N, IN_K, IN_STAGES,
                            DOT_DTYPE)


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _programs(device) -> int:
    if PROGRAMS is not None:
        return PROGRAMS
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def linear_block(residual: torch.Tensor, norm_weight: torch.Tensor, eps: float, barrier: torch.Tensor, *,
                 u: Optional[torch.Tensor] = None, out_weight: Optional[torch.Tensor] = None,
                 sumsq: Optional[torch.Tensor] = None, gated_eps: float = 0.0, hidden: Optional[torch.Tensor] = None,
                 in_weight: Optional[torch.Tensor] = None, conv_state: Optional[torch.Tensor] = None,
                 conv_weight: Optional[torch.Tensor] = None, conv_bias: Optional[torch.Tensor] = None,
                 conv_lo: int = 0, residual_in: bool = True):
    """One launch from a layer's state update to the next one's (see the module docstring).

    residual (rows, d_model), updated in place: residual += hidden, where hidden is out_proj(u) (u (rows, d_ssm)
    the state kernel's gated output, out_weight (d_model, d_ssm)), scaled by rsqrt(sumsq.sum(-1) / d_ssm +
    gated_eps) when sumsq (rows, partials) is given (the folded gated norm), or the given `hidden` (rows, d_model);
    residual_in=False: residual = hidden (the first layer). Then x = RMSNorm(residual) * norm_weight, and with
    in_weight (n_in, d_model): returns in_proj(x) with the conv (+ SiLU) applied to columns [conv_lo, conv_lo +
    conv_dim) (conv_state (rows, conv_dim, width - 1) shifted in place, any strides: slot-major storage, i.e. a
    (rows, width - 1, conv_dim) tensor transposed, makes its loads coalesce; conv_weight (conv_dim, width)); without
    in_weight returns x (the LM head's input). barrier: an int64 counter on the device, zero when first used, the
    same one for every launch of a step."""
    M, D = residual.shape
    dev = residual.device
    if M > MAX_ROWS:
        raise ValueError(f"linear_block: {M} rows; one block of at most {MAX_ROWS} rows")
    if (u is None) == (hidden is None):
        raise ValueError("linear_block: give either u and out_weight (out_proj) or hidden")
    phases = 2 | (1 if u is not None else 0) | (4 if in_weight is not None else 0)
    dtype = norm_weight.dtype
    dot_dtype = tl.float32 if _INTERPRET or dtype == torch.float32 else _tl_dtype(dtype)
    dummy = residual
    K_OUT = n_split = 0
    parts = dummy
    if u is not None:
        K_OUT = u.shape[1]
        if out_weight.shape != (D, K_OUT) or u.shape[0] != M or u.stride(1) != 1 or out_weight.stride(1) != 1:
            raise ValueError(f"linear_block: u {tuple(u.shape)} and out_weight {tuple(out_weight.shape)} do not fit "
                             f"residual {tuple(residual.shape)}")
        n_split = triton.cdiv(K_OUT, OUT_TILE[1])
        parts = torch.empty(n_split, M, D, device=dev, dtype=torch.float32)
    if hidden is not None and hidden.shape != (M, D):
        raise ValueError(f"linear_block: hidden {tuple(hidden.shape)} does not fit residual {tuple(residual.shape)}")
    x = torch.empty(M, D, device=dev, dtype=dtype)
    N_IN, out, width, c_lo, c_hi = 0, x, 2, 0, 0
    if in_weight is not None:
        N_IN = in_weight.shape[0]
        width = conv_weight.shape[1]
        c_lo, c_hi = conv_lo, conv_lo + conv_weight.shape[0]
        if in_weight.shape != (N_IN, D) or conv_state.shape != (M, conv_weight.shape[0], width - 1) or c_hi > N_IN:
            raise ValueError(f"linear_block: in_weight {tuple(in_weight.shape)}, conv_state "
                             f"{tuple(conv_state.shape)} and conv_weight {tuple(conv_weight.shape)} do not fit")
        out = torch.empty(M, N_IN, device=dev, dtype=in_weight.dtype)
    n_ss = sumsq.shape[1] if sumsq is not None else 1
    cs = conv_state if conv_state is not None else dummy
    cw = conv_weight if conv_weight is not None else dummy
    flags = dict(FROM_PARTS=u is not None, N_SPLIT=max(n_split, 1), HAS_RMS=sumsq is not None, HAS_RESIDUAL=residual_in, H_DTYPE=_tl_dtype(
        out_weight.dtype if out_weight is not None else dtype), WIDTH=width, HAS_CONV_BIAS=conv_bias is not None,
        BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_D=triton.next_power_of_2(D),
        BLOCK_SS=triton.next_power_of_2(n_ss), OUT_N=OUT_TILE[0], OUT_K=OUT_TILE[1], IN_N=IN_TILE[0],
        IN_K=IN_TILE[1], IN_STAGES=IN_STAGES, DOT_DTYPE=dot_dtype)
    args = (u if u is not None else dummy, out_weight if out_weight is not None else dummy, parts,
            hidden if hidden is not None else dummy, sumsq if sumsq is not None else dummy, residual, norm_weight, x,
            in_weight if in_weight is not None else dummy, out, cs, cw, conv_bias if conv_bias is not None else cw,
            barrier, M, D, K_OUT, N_IN, n_ss, 1.0 / max(K_OUT, 1), float(gated_eps), float(eps), c_lo, c_hi,
            u.stride(0) if u is not None else 0, out_weight.stride(0) if out_weight is not None else 0,
            parts.stride(0), parts.stride(1) if u is not None else 0, hidden.stride(0) if hidden is not None else 0,
            sumsq.stride(0) if sumsq is not None else 0, residual.stride(0), x.stride(0),
            in_weight.stride(0) if in_weight is not None else 0, out.stride(0),
            *(cs.stride() if conv_state is not None else (0, 0, 0)),
            *(cw.stride() if conv_weight is not None else (0, 0)))
    if _INTERPRET or dev.type != "cuda":  # programs run one after another: one launch per phase, no barrier
        for phase in (1, 2, 4):
            if phases & phase:
                _linear_block_kernel[(_programs(dev),)](*args, PHASES=phase, **flags, BARRIERS=False, USE_PDL=False,
                                                        num_warps=NUM_WARPS)
    else:
        _linear_block_kernel[(_programs(dev),)](*args, PHASES=phases, **flags, BARRIERS=True, num_warps=NUM_WARPS,
                                                **pdl_options())
    return out if in_weight is not None else x
