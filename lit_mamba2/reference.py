"""Pure PyTorch forms of every op: the CPU path and the oracles the Triton kernels are tested against.

SSD (state space duality, Dao & Gu 2024) computes, per head h, with state h_t of shape (headdim, dstate):

    dt_t  = clamp(softplus(dt_t + dt_bias)) ;  a_t = exp(dt_t * A)
    h_t   = a_t * h_{t-1} + dt_t * x_t B_t^T         (the state resets to 0 where seq_idx changes)
    y_t   = h_t C_t + D * x_t ;  y_t *= silu(z_t)

Three forms of it live here: `ssd_recurrent` (that loop, literally), `ssd_quadratic` (the dual, masked-attention
form y = (L ∘ C B^T) (dt x)) and `ssd_chunked` (quadratic inside chunks, the recurrence across chunk states), which
is the one the model runs on CPU. Each takes `lit_mamba2.ssd`'s arguments; arguments are checked in `ops.py`.

Arithmetic is float32 for half/float inputs and float64 for float64 inputs; outputs take x's dtype, states stay
in the compute dtype. `attention` (causal attention within packed documents: SDPA with a dense boolean mask) is the
exception: it computes in its inputs' dtype, as SDPA does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

INF = math.inf


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def process_dt(dt, dt_bias=None, dt_softplus=False, dt_limit=(0.0, INF), dtype=torch.float32):
    """dt + dt_bias, softplus, then the clamp to dt_limit (only when a limit is set, as mamba_ssm does)."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, INF):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _skip_and_gate(y, x, D, z):
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _heads(t, nheads):
    """(b, l, ngroups, n) -> (b, l, nheads, n): each group serves nheads/ngroups consecutive heads."""
    return t.repeat_interleave(nheads // t.shape[2], dim=2)


# ---------------------------------------------------------------------------------------------------------------
# SSD: the recurrence
# ---------------------------------------------------------------------------------------------------------------
def ssd_recurrent(x, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                  dt_softplus=False, dt_limit=(0.0, INF), return_final_states=False):
    """The recurrence, one step at a time. Slow; a test oracle. `chunk_size` is accepted and ignored."""
    cdt = compute_dtype(x, dt, A, B, C)
    b, L, h, p = x.shape
    n = B.shape[-1]
    xc = x.to(cdt)
    dtc = process_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)
    Bh, Ch = _heads(B.to(cdt), h), _heads(C.to(cdt), h)
    state = initial_states.to(cdt) if initial_states is not None else x.new_zeros(b, h, p, n, dtype=cdt)
    ys = []
    for t in range(L):
        if seq_idx is not None and t > 0:
            same = (seq_idx[:, t] == seq_idx[:, t - 1]).to(cdt)[:, None, None, None]
            state = state * same
        decay = torch.exp(dtc[:, t] * A.to(cdt))  # (b, h)
        state = state * decay[:, :, None, None] + (dtc[:, t, :, None, None] * xc[:, t, :, :, None]
                                                   * Bh[:, t, :, None, :])
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1)
    y = _skip_and_gate(y, xc, None if D is None else D.to(cdt), z).to(x.dtype)
    return (y, state) if return_final_states else y


# ---------------------------------------------------------------------------------------------------------------
# SSD: the quadratic (dual, attention-like) form
# ---------------------------------------------------------------------------------------------------------------
def ssd_quadratic(x, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                  dt_softplus=False, dt_limit=(0.0, INF), return_final_states=False):
    """y = M (dt x) with M[t, s] = C_t·B_s exp(Σ_{s<r≤t} dt_r A) over s ≤ t in one document: O(L²). An oracle."""
    cdt = compute_dtype(x, dt, A, B, C)
    b, L, h, p = x.shape
    xc = x.to(cdt)
    dtc = process_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)
    Bh, Ch = _heads(B.to(cdt), h), _heads(C.to(cdt), h)
    cum = torch.cumsum(dtc * A.to(cdt), dim=1)  # (b, L, h): Σ_{r≤t} dt_r A
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    mask = causal[None].expand(b, L, L)
    doc = seq_idx if seq_idx is not None else torch.zeros(b, L, dtype=torch.int32, device=x.device)
    mask = mask & (doc[:, :, None] == doc[:, None, :])
    seg = cum.permute(0, 2, 1)[:, :, :, None] - cum.permute(0, 2, 1)[:, :, None, :]  # (b, h, t, s)
    decay = torch.exp(torch.where(mask[:, None], seg, torch.full_like(seg, -INF)))
    scores = torch.einsum("bthn,bshn->bhts", Ch, Bh) * decay
    y = torch.einsum("bhts,bshp->bthp", scores, xc * dtc[..., None])
    first_doc = (doc == doc[:, :1])  # positions the initial state reaches
    if initial_states is not None:
        h0 = initial_states.to(cdt)
        w = torch.exp(cum) * first_doc[:, :, None].to(cdt)  # (b, L, h)
        y = y + torch.einsum("bthn,bhpn,bth->bthp", Ch, h0, w)
    y = _skip_and_gate(y, xc, None if D is None else D.to(cdt), z).to(x.dtype)
    if not return_final_states:
        return y
    last_doc = (doc == doc[:, -1:]).to(cdt)  # (b, L)
    w = torch.exp(cum[:, -1:] - cum) * dtc * last_doc[:, :, None]  # (b, L, h)
    final = torch.einsum("bsh,bshp,bshn->bhpn", w, xc, Bh)
    if initial_states is not None:
        reach = first_doc[:, -1:].to(cdt)  # (b, 1): is the last position still in the first document?
        final = final + initial_states.to(cdt) * (torch.exp(cum[:, -1]) * reach)[:, :, None, None]
    return y, final


# ---------------------------------------------------------------------------------------------------------------
# SSD: the chunked algorithm (what the model runs on CPU, and what the Triton kernels implement)
# ---------------------------------------------------------------------------------------------------------------
def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                dt_softplus=False, dt_limit=(0.0, INF), return_final_states=False):
    """Quadratic form inside each chunk of `chunk_size` positions; states passed from chunk to chunk."""
    cdt = compute_dtype(x, dt, A, B, C)
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    cs = chunk_size
    pad = (-L) % cs
    xc = x.to(cdt)
    dtc = process_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)
    Bc, Cc = B.to(cdt), C.to(cdt)
    doc = seq_idx if seq_idx is not None else torch.zeros(b, L, dtype=torch.int32, device=x.device)
    if pad:  # dt = 0 on padding: no decay and no input, so the states pass through unchanged
        xc, Bc, Cc = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xc, Bc, Cc))
        dtc = F.pad(dtc, (0, 0, 0, pad))
        doc = torch.cat([doc, doc[:, -1:].expand(b, pad)], dim=1)
    nc = (L + pad) // cs
    xs = xc.view(b, nc, cs, h, p)
    dts = dtc.view(b, nc, cs, h)
    Bs = _heads(Bc, h).view(b, nc, cs, h, n)
    Cs = _heads(Cc, h).view(b, nc, cs, h, n)
    docs = doc.view(b, nc, cs)

    cum = torch.cumsum(dts * A.to(cdt), dim=2)  # (b, nc, cs, h): decay inside the chunk up to each position
    cum_h = cum.permute(0, 1, 3, 2)  # (b, nc, h, cs)
    seg = cum_h[..., :, None] - cum_h[..., None, :]  # (b, nc, h, t, s)
    same_doc = docs[..., :, None] == docs[..., None, :]
    causal = torch.ones(cs, cs, dtype=torch.bool, device=x.device).tril()
    mask = (same_doc & causal)[:, :, None]
    Lmat = torch.exp(torch.where(mask, seg, torch.full_like(seg, -INF)))

    # 1. inside each chunk: the quadratic form
    xdt = xs * dts[..., None]
    scores = torch.einsum("bcthn,bcshn->bchts", Cs, Bs) * Lmat
    y = torch.einsum("bchts,bcshp->bcthp", scores, xdt)

    # 2. each chunk's own contribution to the state at its end (positions in the chunk's last document only)
    in_last = (docs == docs[:, :, -1:]).to(cdt)  # (b, nc, cs)
    w = torch.exp(cum[:, :, -1:] - cum) * in_last[..., None]  # (b, nc, cs, h)
    chunk_states = torch.einsum("bcsh,bcshp,bcshn->bchpn", w, xdt, Bs)

    # 3. pass states across chunks; the carried state survives a chunk only if no document starts inside it
    state = initial_states.to(cdt) if initial_states is not None else x.new_zeros(b, h, p, n, dtype=cdt)
    state_doc = doc[:, 0]  # the document the running state belongs to
    entering = []
    entering_doc = []
    for c in range(nc):
        entering.append(state)
        entering_doc.append(state_doc)
        end_doc = docs[:, c, -1]
        carry = (end_doc == state_doc).to(cdt)[:, None, None, None]
        state = state * torch.exp(cum[:, c, -1])[:, :, None, None] * carry + chunk_states[:, c]
        state_doc = end_doc
    h_in = torch.stack(entering, dim=1)  # (b, nc, h, p, n)
    h_in_doc = torch.stack(entering_doc, dim=1)  # (b, nc)

    # 4. the entering state's effect on each position of the chunk (same document only)
    reach = (docs == h_in_doc[:, :, None]).to(cdt)  # (b, nc, cs)
    y = y + torch.einsum("bcthn,bchpn,bcth->bcthp", Cs, h_in, torch.exp(cum) * reach[..., None])

    y = y.reshape(b, nc * cs, h, p)[:, :L]
    y = _skip_and_gate(y, x.to(cdt), None if D is None else D.to(cdt), z).to(x.dtype)
    return (y, state) if return_final_states else y


# ---------------------------------------------------------------------------------------------------------------
# Depthwise causal conv1d and gated RMSNorm
# ---------------------------------------------------------------------------------------------------------------
def causal_conv1d(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                  activation: str | None = "silu"):
    """Depthwise causal convolution over the sequence.

    x: (batch, seqlen, dim); weight: (dim, width); bias: (dim,); initial_states / final states: (batch, dim,
    width - 1), the inputs before the first position (oldest first). Taps never reach across a change of seq_idx,
    and the initial state reaches only the row's first document.
    """
    b, L, d = x.shape
    w = weight.shape[1]
    cdt = compute_dtype(x, weight)
    xc = x.to(cdt)
    prev = initial_states.to(cdt).transpose(1, 2) if initial_states is not None else xc.new_zeros(b, w - 1, d)
    xp = torch.cat([prev, xc], dim=1)  # (b, w-1+L, d)
    windows = xp.unfold(1, w, 1)  # (b, L, d, w): windows[:, t, :, k] = input at t - (w-1) + k
    if seq_idx is not None:
        doc = seq_idx
        # the document of each padded input position; initial-state slots belong to the first document
        doc_p = torch.cat([doc[:, :1].expand(b, w - 1), doc], dim=1)
        doc_windows = doc_p.unfold(1, w, 1)  # (b, L, w)
        keep = (doc_windows == doc[:, :, None]).to(cdt)
        windows = windows * keep[:, :, None, :]
    out = (windows * weight.to(cdt)).sum(-1)
    if bias is not None:
        out = out + bias.to(cdt)
    if activation == "silu":
        out = F.silu(out)
    elif activation is not None:
        raise ValueError(f"causal_conv1d: activation must be 'silu' or None, got {activation!r}")
    out = out.to(x.dtype)
    if not return_final_states:
        return out
    final = xp[:, -(w - 1):] if w > 1 else xp[:, :0]  # (b, w-1, d)
    if seq_idx is not None and w > 1:
        doc_tail = torch.cat([seq_idx[:, :1].expand(b, w - 1), seq_idx], dim=1)[:, -(w - 1):]
        final = final * (doc_tail == seq_idx[:, -1:]).to(cdt)[..., None]
    return out, final.transpose(1, 2).contiguous()


def gated_rmsnorm(x, z, weight, eps=1e-5, group_size=None, norm_before_gate=False):
    """RMSNorm over groups of `group_size` channels, gated by silu(z) before (default) or after the norm."""
    cdt = compute_dtype(x, weight)
    xc = x.to(cdt)
    if z is not None and not norm_before_gate:
        xc = xc * F.silu(z.to(cdt))
    d = x.shape[-1]
    gs = d if group_size is None else group_size
    xg = xc.unflatten(-1, (d // gs, gs))
    xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    out = xg.flatten(-2) * weight.to(cdt)
    if z is not None and norm_before_gate:
        out = out * F.silu(z.to(cdt))
    return out.to(x.dtype)


def rmsnorm(x, weight, eps=1e-5):
    return gated_rmsnorm(x, None, weight, eps).to(weight.dtype)


# ---------------------------------------------------------------------------------------------------------------
# One token per row (decoding): the recurrence's step, and the fused forms the decode kernels compute
# ---------------------------------------------------------------------------------------------------------------
def conv_step(x, conv_state, weight, bias=None, activation: str | None = "silu"):
    """One input of a depthwise causal conv: x (batch, dim); conv_state (batch, dim, width - 1), oldest first,
    shifted in place; weight (dim, width). Returns the output (batch, dim) in x's dtype."""
    window = torch.cat([conv_state, x[:, :, None].to(conv_state.dtype)], dim=-1)
    out = _conv_window(window, weight, bias, activation)
    conv_state.copy_(window[:, :, 1:])
    return out.to(x.dtype)


def ring_conv_step(x, ring, slot, weight, bias=None, activation: str | None = "silu"):
    """conv_step on a ring of `width` slots: x (batch, dim) overwrites slot `slot` (0-dim int64 tensor, mod width);
    the older inputs are the slots after it, oldest first."""
    w = ring.shape[-1]
    slot = slot.view(1) % w
    older = ring.index_select(-1, (slot + 1 + torch.arange(w - 1, device=x.device)) % w)
    out = _conv_window(torch.cat([older, x[:, :, None].to(ring.dtype)], dim=-1), weight, bias, activation)
    ring.index_copy_(-1, slot, x[:, :, None].to(ring.dtype))
    return out.to(x.dtype)


def _conv_window(window, weight, bias, activation):
    cdt = compute_dtype(window, weight)
    out = (window.to(cdt) * weight.to(cdt)).sum(-1)
    if bias is not None:
        out = out + bias.to(cdt)
    return F.silu(out) if activation == "silu" else out


def ssm_step(state, x, dt, A_log, B, C, D=None, z=None, dt_bias=None, dt_limit=(0.0, INF), norm_weight=None):
    """One token of the SSD recurrence with A = -exp(A_log) and dt through softplus: state (batch, nheads, headdim,
    dstate) updated in place; x, z (batch, nheads, headdim); dt (batch, nheads); B, C (batch, ngroups, dstate).
    Returns y (batch, nheads, headdim) in x's dtype, gated by silu(z) when z is given.
    norm_weight (nheads * headdim,): the gated RMSNorm's weight folded in (one norm group over all channels):
    returns (y * norm_weight, sumsq) with sumsq (batch, 1) = sum of the gated y's squares, whose rsqrt(mean
    + eps) the next add+norm applies (the norm's per-row scale commutes with out_proj)."""
    cdt = compute_dtype(state, x)
    h = state.shape[1]
    A = -torch.exp(A_log.to(cdt))
    dt = process_dt(dt, dt_bias, True, dt_limit, cdt)
    xf = x.to(cdt)
    new = (state.to(cdt) * torch.exp(dt * A)[..., None, None]
           + (dt[..., None] * xf)[..., None] * _heads(B[:, None], h)[:, 0, :, None, :].to(cdt))
    state.copy_(new)
    y = torch.einsum("bhpn,bhn->bhp", new, _heads(C[:, None], h)[:, 0].to(cdt))
    y = _skip_and_gate(y, xf, None if D is None else D.to(cdt), z)
    if norm_weight is None:
        return y.to(x.dtype)
    sumsq = y.pow(2).flatten(1).sum(-1, keepdim=True)  # float32 (float64 for a float64 model)
    return (y.flatten(1) * norm_weight.to(cdt)).view_as(y).to(x.dtype), sumsq


def add_rmsnorm(hidden, residual, weight, eps, residual_dtype, hidden_rms=None):
    """A pre-norm block's entry for one token per row: residual' = residual + hidden (hidden alone when residual is
    None) in residual_dtype, and (RMSNorm(residual') in weight's dtype, residual'). hidden_rms = (sumsq, n, eps):
    hidden is a folded gated norm's raw output, first scaled by rsqrt(sumsq.sum(-1) / n + eps)."""
    cdt = compute_dtype(hidden, weight)
    h = hidden.to(cdt)
    if hidden_rms is not None:
        sumsq, n, h_eps = hidden_rms
        h = h * torch.rsqrt(sumsq.to(cdt).sum(-1, keepdim=True) / n + h_eps)
    r = h if residual is None else residual.to(cdt) + h
    r = r.to(residual_dtype)
    return rmsnorm(r, weight, eps), r


def add_norm_linear(hidden, residual, norm_weight, eps, weight, bias=None, residual_dtype=None):
    """(linear(RMSNorm(residual + hidden)), residual + hidden): hidden None means it was already added to the
    residual; residual None means hidden alone. The residual' is returned as None when residual_dtype is None and
    hidden is given (the LM head needs only the output)."""
    if hidden is None:
        return F.linear(rmsnorm(residual, norm_weight, eps).to(weight.dtype), weight, bias), residual
    normed, r = add_rmsnorm(hidden, residual, norm_weight, eps, residual_dtype or compute_dtype(hidden, residual))
    return F.linear(normed.to(weight.dtype), weight, bias), r if residual_dtype is not None else None


def gated_norm_linear(y, z, norm_weight, eps, ngroups, norm_before_gate, weight, bias=None, residual=None):
    """linear(gated_rmsnorm(y, z)) over `ngroups` norm groups; with `residual`, also residual += out in place."""
    out = F.linear(gated_rmsnorm(y, z, norm_weight, eps, y.shape[-1] // ngroups, norm_before_gate).to(weight.dtype),
                   weight, bias)
    if residual is not None:
        residual.add_(out.to(residual.dtype))
    return out


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean"):
    """F.cross_entropy of the LM head's logits, computed in float32 (float64 for a float64 model)."""
    logits = F.linear(hidden, weight)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


# Causal attention within packed documents
# ---------------------------------------------------------------------------------------------------------------
def attention_mask(q_len, kv_len, doc_q=None, doc_k=None, q_offset=None, device=None):
    """The boolean mask of `attention`, (batch or 1, 1, Lq, Lk): query i (at key position q_offset + i) sees key j
    iff j <= q_offset + i and, given documents, doc_q[:, i] == doc_k[:, j]."""
    q_offset = kv_len - q_len if q_offset is None else q_offset
    qpos = torch.arange(q_len, device=device) + q_offset
    mask = (torch.arange(kv_len, device=device)[None, :] <= qpos[:, None])[None, None]
    if doc_q is not None:
        mask = mask & (doc_q[:, None, :, None] == doc_k[:, None, None, :])
    return mask


def attention(q, k, v, doc_q=None, doc_k=None, q_offset=None, scale=None):
    """Causal attention (`lit_mamba2.attention`'s arguments, checked there): SDPA with is_causal when there are no
    documents and Lq == Lk, else with the dense boolean mask of `attention_mask`. q: (batch, heads, Lq, head_dim);
    k, v: (batch, heads_kv, Lk, head_dim); doc_q defaults to doc_k's last Lq ids (or doc_k to doc_q, Lq == Lk).

    Unlike the references above it computes in the inputs' dtype: SDPA accumulates half inputs in float32 itself, and
    on CUDA this is the model's path without the fast kernels, which an upcast copy would slow down."""
    q_len, kv_len = q.shape[2], k.shape[2]
    q_offset = kv_len - q_len if q_offset is None else q_offset
    if doc_q is None and doc_k is not None:
        doc_q = doc_k[:, q_offset:q_offset + q_len]
    elif doc_k is None and doc_q is not None:
        doc_k = doc_q
    gqa = q.shape[1] != k.shape[1]
    if doc_q is None and q_len == kv_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = attention_mask(q_len, kv_len, doc_q, doc_k, q_offset, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
