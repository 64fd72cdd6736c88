"""One decoding step for every row, from the model's weights (weights.py), with the decode specialisations:

- ring conv state (`MixerCache.ring`): the last d_conv inputs in a ring, the token at cache position t writing
  slot t % d_conv; it saves the shift and lets one kernel do the conv and the state update (ops.ring_mixer_step).
- fused linears (`fuse_linear`): a Mamba-2 block in three launches, [residual add, norm, in_proj], [conv + state
  update], [gated norm, out_proj, residual add] (ops.add_norm_linear / gated_norm_linear; small batches).
- folded gated norm (`fold_norm`): where the norm's per-row scale commutes with out_proj (MixerWeights.
  norm_commutes), the state kernel applies the gate and weight and returns the sums of squares; the next add+norm
  applies the scale (UnscaledHidden): one launch less per layer.

Each form equals the model's plain step (Mamba2LMHeadModel.step) in exact arithmetic; tests check them against
model.forward token by token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from lit_mamba2 import ops
from lit_mamba2.inference.weights import AttentionWeights, LayerWeights, MixerWeights, ModelWeights, Norm
from lit_mamba2.model import apply_rotary


@dataclass
class MixerCache:
    """A Mamba-2 layer's decoding state: conv inputs (shifted, (batch, conv_dim, d_conv - 1), or a ring of d_conv
    slots) and the SSM state (batch, nheads, headdim, d_state)."""

    conv: torch.Tensor
    ssm: torch.Tensor
    ring: bool = False


@dataclass
class KVSlots:
    """An attention layer's fixed-size KV cache (batch, heads_kv, max_len, head_dim), so that a CUDA graph can
    capture the step, and its short conv's state."""

    k: torch.Tensor
    v: torch.Tensor
    conv: Optional[torch.Tensor] = None


@dataclass
class DecodePositions:
    """Where each row stands: cache_pos () int64, the KV slot (and ring slot) the next token writes (equal for all
    rows: prompts are left-padded); positions (batch,) the next token's rotary position within its prompt; kv_start
    (batch,) each row's first real KV slot (slots before it hold padding and are masked out)."""

    cache_pos: torch.Tensor
    positions: torch.Tensor
    kv_start: torch.Tensor


@dataclass
class UnscaledHidden:
    """A mixer step's output with its gated RMSNorm folded: raw = out_proj(y · silu(z) · w) still lacks the norm's
    per-row scale rsqrt(sumsq.sum(-1) / dim + eps), which the next add+norm applies."""

    raw: torch.Tensor  # (batch, d_model)
    sumsq: torch.Tensor  # (batch, partials) float32
    dim: int
    eps: float


def add_norm(hidden, residual, norm: Norm, residual_in_fp32: bool, impl):
    """residual += hidden (hidden None: already added; an UnscaledHidden: scaled first); returns (norm(residual),
    residual)."""
    if hidden is None:
        hidden, residual = residual, None
    rms = None
    if isinstance(hidden, UnscaledHidden):
        hidden, rms = hidden.raw, (hidden.sumsq, hidden.dim, hidden.eps)
    return ops.add_rmsnorm(hidden, residual, norm.weight, norm.eps, residual_dtype(hidden, residual_in_fp32), rms,
                           impl=impl)


def residual_dtype(hidden, residual_in_fp32: bool) -> torch.dtype:
    """The residual stream's dtype after adding `hidden`: float32 with residual_in_fp32 (float64 stays)."""
    return torch.float32 if residual_in_fp32 and hidden.dtype != torch.float64 else hidden.dtype


def _conv_and_state(w: MixerWeights, z, xBC, dt, cache: MixerCache, slot, norm_weight, impl):
    """The conv (+ SiLU) and the state update of one token: y (batch, nheads, headdim), or (u, sumsq) with
    norm_weight. z gates y in the kernel where there is no separate norm or the norm is folded."""
    b = xBC.shape[0]
    gated = w.norm is None or norm_weight is not None
    z = z.view(b, w.nheads, w.headdim) if gated else None
    if cache.ring:
        return ops.ring_mixer_step(cache.ssm, cache.conv, slot, xBC, w.conv, w.conv_bias, dt, w.A_log, w.D, z,
                                   w.dt_bias, w.dt_limit, w.ngroups, norm_weight=norm_weight, impl=impl)
    xBC = ops.conv_step(xBC, cache.conv, w.conv, w.conv_bias, "silu", impl=impl)
    x, B, C = torch.split(xBC, [w.d_ssm, w.ngroups * w.d_state, w.ngroups * w.d_state], dim=-1)
    return ops.ssm_step(cache.ssm, x.view(b, w.nheads, w.headdim), dt, w.A_log, B.view(b, w.ngroups, w.d_state),
                        C.view(b, w.ngroups, w.d_state), w.D, z, w.dt_bias, w.dt_limit, norm_weight=norm_weight,
                        impl=impl)


def mixer_step(w: MixerWeights, u, cache: MixerCache, slot, fold_norm: bool, impl):
    """u (batch, d_model) -> (batch, d_model), or an UnscaledHidden with fold_norm where the norm commutes."""
    b = u.shape[0]
    z0, x0, z, xBC, dt = torch.split(F.linear(u, w.in_proj, w.in_proj_bias),
                                     [w.d_mlp, w.d_mlp, w.d_ssm, w.conv_dim, w.nheads], dim=-1)
    if fold_norm and w.norm_commutes:
        y, sumsq = _conv_and_state(w, z, xBC, dt, cache, slot, w.norm.weight, impl)
        return UnscaledHidden(F.linear(y.view(b, w.d_ssm), w.out_proj), sumsq, w.d_ssm, w.norm.eps)
    y = _conv_and_state(w, z, xBC, dt, cache, slot, None, impl).reshape(b, w.d_ssm)
    if w.norm is not None:
        y = ops.gated_rmsnorm(y, z, w.norm.weight, w.norm.eps, w.d_ssm // w.norm_groups, w.norm_before_gate,
                              impl=impl)
    if w.d_mlp > 0:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return F.linear(y, w.out_proj, w.out_proj_bias)


def can_fuse_linear(w) -> bool:
    return isinstance(w, MixerWeights) and w.norm is not None and w.d_mlp == 0


def fused_mixer_step(w: MixerWeights, hidden, residual, norm: Norm, cache: MixerCache, slot, residual_in_fp32,
                     impl):
    """A whole pre-norm Mamba-2 block in three launches; hidden may be None (already in residual). Returns the
    residual, which then includes this layer's output."""
    b = residual.shape[0] if hidden is None else hidden.shape[0]
    rdt = None if hidden is None else residual_dtype(hidden, residual_in_fp32)
    zxbcdt, residual = ops.add_norm_linear(hidden, residual, norm.weight, norm.eps, w.in_proj, w.in_proj_bias,
                                           rdt, impl=impl)
    z, xBC, dt = torch.split(zxbcdt, [w.d_ssm, w.conv_dim, w.nheads], dim=-1)
    y = _conv_and_state(w, z, xBC, dt, cache, slot, None, impl).view(b, w.d_ssm)
    ops.gated_norm_linear(y, z, w.norm.weight, w.norm.eps, w.norm_groups, w.norm_before_gate, w.out_proj,
                          w.out_proj_bias, residual=residual, impl=impl)
    return residual


def attention_step(w: AttentionWeights, x, cache: KVSlots, pos: DecodePositions, impl):
    """One token per row into the fixed-size cache at slot pos.cache_pos; keys before pos.kv_start (left padding)
    and after the slot are masked out."""
    b = x.shape[0]
    qkv = F.linear(x, w.in_proj, w.in_proj_bias)
    if w.mlp_dim > 0:
        qkv, x_mlp = qkv.split([w.qkv_dim, w.mlp_dim], dim=-1)
        up, gate = x_mlp.chunk(2, dim=-1)
        x_mlp = up * F.silu(gate)
    if w.conv is not None:
        qkv = ops.conv_step(qkv, cache.conv, w.conv, w.conv_bias, None, impl=impl)
    q, k, v = qkv.split([w.num_heads * w.head_dim, w.num_heads_kv * w.head_dim, w.num_heads_kv * w.head_dim], dim=-1)
    p = pos.positions[:, None]
    q = apply_rotary(q.view(b, 1, w.num_heads, w.head_dim), p, w.rotary_dim, w.rotary_base)
    k = apply_rotary(k.view(b, 1, w.num_heads_kv, w.head_dim), p, w.rotary_dim, w.rotary_base)
    v = v.view(b, 1, w.num_heads_kv, w.head_dim)
    slot = pos.cache_pos.view(1)
    cache.k.index_copy_(2, slot, k.transpose(1, 2).to(cache.k.dtype))
    cache.v.index_copy_(2, slot, v.transpose(1, 2).to(cache.v.dtype))
    ar = torch.arange(cache.k.shape[2], device=x.device)
    mask = (ar[None, :] >= pos.kv_start[:, None]) & (ar[None, :] <= pos.cache_pos)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), cache.k, cache.v, attn_mask=mask[:, None, None, :],
                                         scale=w.scale, enable_gqa=w.num_heads != w.num_heads_kv)
    out = out.transpose(1, 2).reshape(b, w.num_heads * w.head_dim)
    if w.mlp_dim > 0:
        out = torch.cat([out, x_mlp], dim=-1)
    return F.linear(out, w.out_proj, w.out_proj_bias)


def layer_step(lw: LayerWeights, hidden, residual, cache, pos: DecodePositions, fuse_linear: bool,
               fold_norm: bool, residual_in_fp32: bool, impl):
    """Returns (hidden, residual); hidden None when a fused step added the mixer's output to the residual, an
    UnscaledHidden when the mixer's gated norm was folded."""
    m = lw.mixer
    if fuse_linear and can_fuse_linear(m):
        residual = fused_mixer_step(m, hidden, residual, lw.norm, cache, pos.cache_pos, residual_in_fp32, impl)
        hidden = None
    else:
        normed, residual = add_norm(hidden, residual, lw.norm, residual_in_fp32, impl)
        hidden = (mixer_step(m, normed, cache, pos.cache_pos, fold_norm, impl) if isinstance(m, MixerWeights)
                  else attention_step(m, normed, cache, pos, impl))
    if lw.fc1 is not None:
        normed, residual = add_norm(hidden, residual, lw.norm2, residual_in_fp32, impl)
        y, gate = F.linear(normed, lw.fc1).chunk(2, dim=-1)
        hidden = F.linear(y * F.silu(gate), lw.fc2)
    return hidden, residual


def decode_step(w: ModelWeights, token, caches: list, pos: DecodePositions, fuse_linear: bool = False,
                fold_norm: bool = False, impl: Optional[str] = None) -> torch.Tensor:
    """token (batch,) -> logits (batch, padded_vocab); every cache advances in place (pos does not: the caller
    advances it)."""
    hidden, residual = F.embedding(token, w.embedding), None
    for lw, cache in zip(w.layers, caches):
        hidden, residual = layer_step(lw, hidden, residual, cache, pos, fuse_linear, fold_norm, w.residual_in_fp32,
                                      impl)
    if fuse_linear:
        return ops.add_norm_linear(hidden, residual, w.norm_f.weight, w.norm_f.eps, w.lm_head, impl=impl)[0]
    normed = add_norm(hidden, residual, w.norm_f, w.residual_in_fp32, impl)[0]
    return F.linear(normed.to(w.lm_head.dtype), w.lm_head)
