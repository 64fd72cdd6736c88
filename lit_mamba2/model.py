"""Mamba-2 and hybrid Mamba-2/attention language models in plain PyTorch.

Parameter names equal mamba_ssm's state dict (`backbone.layers.{i}.mixer.in_proj.weight`, ...), so a published
state dict loads unchanged. The model knows nothing of ranks or devices: parallelism wraps it from outside, and
every op's state goes in and out explicitly (`states`), which is what chunked prefill, decoding and context
parallelism build on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_mamba2 import ops
from lit_mamba2.config import Mamba2Config


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """float32 for half precisions; float64 stays float64 (a float64 model computes in float64 throughout)."""
    return t if t.dtype == torch.float64 else t.float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x):
        x32, w32 = at_least_fp32(x), at_least_fp32(self.weight)
        return F.rms_norm(x32, (x.shape[-1],), w32, self.eps).to(self.weight.dtype)


class GatedRMSNorm(nn.Module):
    """mamba_ssm's RMSNormGated: norm over groups of channels, gated by silu(z)."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: Optional[int] = None, norm_before_gate: bool = False):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size or dim, norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim))
        self.impl: Optional[str] = None

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x, z=None):
        return ops.gated_rmsnorm(x, z, self.weight, self.eps, self.group_size, self.norm_before_gate, impl=self.impl)


@dataclass
class Mamba2State:
    """A Mamba-2 layer's recurrent state: the last d_conv - 1 conv inputs and the SSM state."""

    conv: torch.Tensor  # (batch, conv_dim, d_conv - 1), oldest first
    ssm: torch.Tensor  # (batch, nheads, headdim, d_state), float32 (float64 for a float64 model)
    # Decoding only (generation.Decoder): conv holds d_conv slots used as a ring, the token at cache position t
    # writing slot t % d_conv; it saves the shift and lets one kernel do conv and state update without races.
    ring: bool = False


@dataclass
class UnscaledHidden:
    """A Mamba-2 mixer step's output with its gated RMSNorm folded (Decoder fold_gated_norm): raw = out_proj(y ·
    silu(z) · w) still lacks the norm's per-row scale rstd = rsqrt(sumsq.sum(-1) / dim + eps), which the next
    add+norm applies (out_proj is linear and the scale is one number per row, so it commutes with out_proj)."""

    raw: torch.Tensor  # (batch, d_model)
    sumsq: torch.Tensor  # (batch, partials) float32: partial sums of (y · silu(z))^2 over the row's dim channels
    dim: int
    eps: float

    def scaled(self) -> torch.Tensor:
        """The mixer's output as the unfolded step computes it, in float32 (the PyTorch path's add+norm)."""
        return self.raw.float() * torch.rsqrt(self.sumsq.sum(-1, keepdim=True) / self.dim + self.eps)


def _step_on_triton(t: torch.Tensor, impl: Optional[str]) -> bool:
    """The one-token kernels run on CUDA unless impl="torch"; impl="triton" forces them (CPU: TRITON_INTERPRET=1)."""
    return impl == "triton" or (impl is None and t.is_cuda and ops.triton_available())


def conv_step(x, conv_state, weight, bias, activation, impl=None):
    """One input of a depthwise causal conv: x (b, dim); conv_state (b, dim, width - 1) shifted in place."""
    if _step_on_triton(x, impl):
        from lit_mamba2.kernels.state_update import conv_step as conv_step_triton

        return conv_step_triton(x, conv_state, weight, bias, activation)
    window = torch.cat([conv_state, x[:, :, None].to(conv_state.dtype)], dim=-1)
    out = (at_least_fp32(window) * at_least_fp32(weight)).sum(-1)
    if bias is not None:
        out = out + at_least_fp32(bias)
    conv_state.copy_(window[:, :, 1:])
    return (F.silu(out) if activation == "silu" else out).to(x.dtype)


def ring_conv_step(x, ring, cache_pos, weight, bias):
    """conv_step (with SiLU) on a ring of width slots: x (b, dim) goes to slot cache_pos % width; the older
    inputs are the slots after it, oldest first."""
    w = ring.shape[-1]
    slot = cache_pos.view(1) % w
    older = ring.index_select(-1, (slot + 1 + torch.arange(w - 1, device=x.device)) % w)
    window = torch.cat([older, x[:, :, None].to(ring.dtype)], dim=-1)
    out = (at_least_fp32(window) * at_least_fp32(weight)).sum(-1)
    if bias is not None:
        out = out + at_least_fp32(bias)
    ring.index_copy_(-1, slot, x[:, :, None].to(ring.dtype))
    return F.silu(out).to(x.dtype)


def ssm_step(state, x, dt, A_log, B, C, D=None, z=None, dt_bias=None, dt_limit=(0.0, math.inf), impl=None,
             norm_weight=None):
    """One token of the SSD recurrence with A = -exp(A_log): state (b, h, p, n) float32 updated in place;
    returns y (b, h, p). norm_weight (Triton only): the gated norm folded in, returns (u, sumsq) (state_update)."""
    if _step_on_triton(x, impl):
        from lit_mamba2.kernels.state_update import state_update

        return state_update(state, x, dt, A_log, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                            dt_limit=dt_limit, A_is_log=True, norm_weight=norm_weight)
    assert norm_weight is None, "ssm_step: the folded gated norm (norm_weight) runs on the Triton path only"
    cdt = torch.float64 if torch.float64 in (state.dtype, x.dtype) else torch.float32
    A = -torch.exp(A_log.to(cdt))
    h = state.shape[1]
    dt = dt.to(cdt) + (dt_bias.to(cdt) if dt_bias is not None else 0.0)
    dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, math.inf):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    Bh = B.to(cdt).repeat_interleave(h // B.shape[1], dim=1)
    Ch = C.to(cdt).repeat_interleave(h // C.shape[1], dim=1)
    xf = x.to(cdt)
    new = state.to(cdt) * torch.exp(dt * A)[..., None, None] + (dt[..., None] * xf)[..., None] * Bh[:, :, None, :]
    state.copy_(new)
    y = torch.einsum("bhpn,bhn->bhp", new, Ch)
    if D is not None:
        y = y + xf * (D.to(cdt)[:, None] if D.dim() == 1 else D.to(cdt))
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(x.dtype)


class Mamba2Mixer(nn.Module):
    """in_proj -> [z, x, B, C, dt]; causal conv1d + SiLU over xBC; SSD; D skip; gated RMSNorm; out_proj."""

    def __init__(self, config: Mamba2Config, layer_idx: int = 0):
        super().__init__()
        s = config.ssm
        self.layer_idx = layer_idx
        self.d_model, self.d_inner, self.d_ssm = config.d_model, config.d_inner, config.d_ssm
        self.headdim, self.ngroups, self.d_state = s["headdim"], s["ngroups"], s["d_state"]
        self.nheads = config.nheads
        self.d_conv, self.chunk_size = s["d_conv"], s["chunk_size"]
        self.dt_limit = tuple(s["dt_limit"])
        self.cfg = s
        self.d_mlp = self.d_inner - self.d_ssm  # channels that skip the SSM (d_ssm < d_inner)
        self.conv_dim = self.d_ssm + 2 * self.ngroups * self.d_state
        self.in_proj = nn.Linear(self.d_model, 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads,
                                 bias=s["bias"])
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.d_conv, groups=self.conv_dim,
                                padding=self.d_conv - 1, bias=s["conv_bias"])
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.d_ssm if s["D_has_hdim"] else self.nheads))
        self.norm = (GatedRMSNorm(self.d_ssm, config.norm_epsilon, self.d_ssm // self.ngroups, s["norm_before_gate"])
                     if s["rmsnorm"] else None)
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=s["bias"])
        self.impl: Optional[str] = None
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        s = self.cfg
        self.in_proj.reset_parameters()
        self.conv1d.reset_parameters()
        if s["conv_init"] is not None:
            nn.init.uniform_(self.conv1d.weight, -s["conv_init"], s["conv_init"])
        self.out_proj.reset_parameters()
        for lin in (self.in_proj, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        # dt log-uniform in [dt_min, dt_max]; dt_bias is its inverse softplus so that softplus(dt_bias) = dt
        log_lo, log_hi = math.log(s["dt_min"]), math.log(s["dt_max"])
        dt = torch.exp(torch.rand(self.nheads, device=self.dt_bias.device) * (log_hi - log_lo) + log_lo)
        dt = dt.clamp(min=s["dt_init_floor"])
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        lo, hi = s["A_init_range"]
        self.A_log.copy_(torch.log(torch.empty(self.nheads, device=self.A_log.device).uniform_(lo, hi)))
        nn.init.ones_(self.D)
        if self.norm is not None:
            self.norm.reset_parameters()

    def empty_state(self, batch: int, device=None, dtype=None) -> Mamba2State:
        device = device or self.in_proj.weight.device
        dtype = dtype or self.in_proj.weight.dtype
        return Mamba2State(conv=torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
                           ssm=torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device,
                                           dtype=torch.float64 if dtype == torch.float64 else torch.float32))

    def forward(self, u, seq_idx=None, state: Optional[Mamba2State] = None):
        """u: (batch, seqlen, d_model). With `state`, it is the state before u, and is replaced by the state after."""
        b, L, _ = u.shape
        zxbcdt = self.in_proj(u)
        z0, x0, z, xBC, dt = torch.split(
            zxbcdt, [self.d_mlp, self.d_mlp, self.d_ssm, self.conv_dim, self.nheads], dim=-1)
        conv_out = ops.causal_conv1d(
            xBC, self.conv1d.weight[:, 0, :], self.conv1d.bias, seq_idx=seq_idx,
            initial_states=None if state is None else state.conv, return_final_states=state is not None,
            activation="silu", impl=self.impl)
        if state is not None:
            xBC, conv_state = conv_out
        else:
            xBC = conv_out
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        A = -torch.exp(at_least_fp32(self.A_log))
        D = self.D.view(self.nheads, self.headdim) if self.cfg["D_has_hdim"] else self.D
        out = ops.ssd(
            x.view(b, L, self.nheads, self.headdim), dt, A,
            B.view(b, L, self.ngroups, self.d_state), C.view(b, L, self.ngroups, self.d_state),
            self.chunk_size, D=D, z=None if self.norm is not None else z.view(b, L, self.nheads, self.headdim),
            dt_bias=self.dt_bias, initial_states=None if state is None else state.ssm, seq_idx=seq_idx,
            dt_softplus=True, dt_limit=self.dt_limit, return_final_states=state is not None, impl=self.impl)
        if state is not None:
            y, ssm_state = out
            state.conv, state.ssm = conv_state.to(state.conv.dtype), ssm_state.to(state.ssm.dtype)
        else:
            y = out
        y = y.reshape(b, L, self.d_ssm)
        if self.norm is not None:
            y = self.norm(y, z)
        if self.d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    def norm_commutes(self) -> bool:
        """A gated norm of one group with the gate before the norm, no channels beside the SSM, and an out_proj
        without bias: the norm's per-row scale commutes with out_proj (so it can fold, see step)."""
        n = self.norm
        return (n is not None and n.group_size == self.d_ssm and not n.norm_before_gate and self.d_mlp == 0
                and self.out_proj.bias is None)

    def can_fold_norm(self, t: torch.Tensor) -> bool:
        """Whether step(fold_norm=True) applies: Triton kernels and norm_commutes()."""
        return self.norm_commutes() and _step_on_triton(t, self.impl)

    def step(self, u, state: Mamba2State, pos=None, fold_norm: bool = False):
        """One token per row, u: (batch, d_model) -> (batch, d_model), advancing `state` in place (so that a
        CUDA graph can capture it). Equal to forward on a length-1 sequence with the same state.
        fold_norm: where can_fold_norm, the gated norm rides in the state kernel and the next add+norm, and the
        output is an UnscaledHidden (one launch less per layer and step)."""
        b = u.shape[0]
        z0, x0, z, xBC, dt = torch.split(
            self.in_proj(u), [self.d_mlp, self.d_mlp, self.d_ssm, self.conv_dim, self.nheads], dim=-1)
        if fold_norm and self.can_fold_norm(u):
            y, sumsq = self._conv_ssm_step(z, xBC, dt, state, pos, norm_weight=self.norm.weight)
            return UnscaledHidden(self.out_proj(y.view(b, self.d_ssm)), sumsq, self.d_ssm, self.norm.eps)
        y = self._conv_ssm_step(z, xBC, dt, state, pos).reshape(b, self.d_ssm)
        if self.norm is not None:
            y = self.norm(y, z)
        if self.d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    def _conv_ssm_step(self, z, xBC, dt, state: Mamba2State, pos, norm_weight=None):
        """The conv (+ SiLU) and the SSM state update of one token: y (batch, nheads, headdim); with norm_weight
        (the folded gated norm, Triton only), (u, sumsq) as kernels.state_update.state_update returns them."""
        b = xBC.shape[0]
        D = self.D.view(self.nheads, self.headdim) if self.cfg["D_has_hdim"] else self.D
        gated = self.norm is None or norm_weight is not None  # the kernel gates y by silu(z) itself
        z_gate = z.view(b, self.nheads, self.headdim) if gated else None
        weight = self.conv1d.weight[:, 0, :]
        if state.ring and _step_on_triton(xBC, self.impl):
            from lit_mamba2.kernels.state_update import mixer_step

            return mixer_step(state.ssm, state.conv, pos.cache_pos, xBC, weight, self.conv1d.bias, dt, self.A_log,
                              D=D, z=z_gate, dt_bias=self.dt_bias, dt_limit=self.dt_limit, ngroups=self.ngroups,
                              norm_weight=norm_weight)
        if state.ring:
            xBC = ring_conv_step(xBC, state.conv, pos.cache_pos, weight, self.conv1d.bias)
        else:
            xBC = conv_step(xBC, state.conv, weight, self.conv1d.bias, "silu", self.impl)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        return ssm_step(state.ssm, x.view(b, self.nheads, self.headdim), dt, self.A_log,
                        B.view(b, self.ngroups, self.d_state), C.view(b, self.ngroups, self.d_state), D=D,
                        z=z_gate, dt_bias=self.dt_bias, dt_limit=self.dt_limit, impl=self.impl,
                        norm_weight=norm_weight)

    def can_fuse_linear(self, t: torch.Tensor) -> bool:
        """Whether fused_step applies: Triton kernels, a gated norm, and no channels beside the SSM."""
        return self.norm is not None and self.d_mlp == 0 and _step_on_triton(t, self.impl)

    def fused_step(self, hidden, residual, norm: RMSNorm, state: Mamba2State, pos, residual_dtype):
        """A whole pre-norm block's mixer step in three launches (small batches; kernels/decode_linear.py):
        [residual += hidden, norm, in_proj], [conv + state update], [gated norm, out_proj, residual += out].
        hidden may be None (already in residual). Returns the residual, which then includes this layer's output."""
        from lit_mamba2.kernels.decode_linear import add_norm_linear, gated_norm_linear

        b = residual.shape[0] if hidden is None else hidden.shape[0]
        zxbcdt, residual = add_norm_linear(hidden, residual, norm.weight, norm.eps, self.in_proj.weight,
                                           self.in_proj.bias, residual_dtype)
        z, xBC, dt = torch.split(zxbcdt, [self.d_ssm, self.conv_dim, self.nheads], dim=-1)
        y = self._conv_ssm_step(z, xBC, dt, state, pos).view(b, self.d_ssm)
        gated_norm_linear(y, z, self.norm.weight, self.norm.eps, self.d_ssm // self.norm.group_size,
                          self.norm.norm_before_gate, self.out_proj.weight, self.out_proj.bias, residual=residual)
        return residual


@dataclass
class DecodePositions:
    """Where each row stands while decoding with fixed-size KV caches (what attention layers' `step` needs).

    cache_pos: () int64, the KV slot the next token writes (equal for all rows: prompts are left-padded);
    positions: (batch,) int64, the next token's rotary position within its own prompt; kv_start: (batch,) int64,
    each row's first real KV slot (slots before it hold padding and are masked out). `advance` moves on by one
    token in place, so a captured CUDA graph can replay it."""

    cache_pos: torch.Tensor
    positions: torch.Tensor
    kv_start: torch.Tensor

    def advance(self):
        self.cache_pos.add_(1)
        self.positions.add_(1)


@dataclass
class KVCache:
    """An attention layer's keys and values so far (and its conv state when the layer has a short conv)."""

    k: torch.Tensor  # (batch, num_heads_kv, seqlen, head_dim)
    v: torch.Tensor
    conv: Optional[torch.Tensor] = None  # (batch, qkv_dim, d_conv - 1)


def rotary_positions(seq_idx: Optional[torch.Tensor], b: int, L: int, device) -> torch.Tensor:
    """Each position's offset inside its own document, so that packing never shifts a document's rotary phases."""
    pos = torch.arange(L, device=device).expand(b, L)
    if seq_idx is None:
        return pos
    starts = torch.ones(b, L, dtype=torch.bool, device=device)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    start_pos = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
    return pos - start_pos


def apply_rotary(x, pos, dim: int, base: float):
    """GPT-NeoX (non-interleaved) rotary embedding on the first `dim` channels. x: (b, L, heads, head_dim)."""
    if dim == 0:
        return x
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    angles = pos.to(torch.float32)[..., None] * inv_freq  # (b, L, dim/2)
    cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]
    if x.dtype == torch.float64:
        angles64 = pos.to(torch.float64)[..., None] * inv_freq.double()
        cos, sin = angles64.cos()[:, :, None, :], angles64.sin()[:, :, None, :]
    x_rot, x_pass = x[..., :dim].to(cos.dtype), x[..., dim:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, x_pass], dim=-1)


class Attention(nn.Module):
    """mamba_ssm's MHA for hybrids: GQA, rotary on the first rotary_emb_dim channels, optional short causal conv
    over qkv, optional gated MLP sharing in_proj/out_proj; computed with scaled_dot_product_attention."""

    def __init__(self, config: Mamba2Config, layer_idx: int = 0):
        super().__init__()
        a = config.attn
        self.layer_idx = layer_idx
        self.num_heads, self.num_heads_kv, self.head_dim = a["num_heads"], a["num_heads_kv"], a["head_dim"]
        self.rotary_dim, self.rotary_base = a["rotary_emb_dim"], a["rotary_emb_base"]
        self.softmax_scale, self.d_conv = a["softmax_scale"], a["d_conv"]
        self.mlp_dim = math.ceil(a["mlp_dim"] / 256) * 256
        self.qkv_dim = self.head_dim * (self.num_heads + 2 * self.num_heads_kv)
        out_dim = self.head_dim * self.num_heads
        self.in_proj = nn.Linear(config.d_model, self.qkv_dim + self.mlp_dim, bias=a["qkv_proj_bias"])
        if self.d_conv > 0:
            self.conv1d = nn.Conv1d(self.qkv_dim, self.qkv_dim, self.d_conv, padding=self.d_conv - 1,
                                    groups=self.qkv_dim)
        self.out_proj = nn.Linear(out_dim + self.mlp_dim // 2, config.d_model, bias=a["out_proj_bias"])
        self.impl: Optional[str] = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for m in (self.in_proj, self.out_proj):
            m.reset_parameters()
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        if self.d_conv > 0:
            self.conv1d.reset_parameters()

    def forward(self, x, seq_idx=None, state: Optional[KVCache] = None):
        b, L, _ = x.shape
        qkv = self.in_proj(x)
        if self.mlp_dim > 0:
            qkv, x_mlp = qkv.split([self.qkv_dim, self.mlp_dim], dim=-1)
            up, gate = x_mlp.chunk(2, dim=-1)
            x_mlp = up * F.silu(gate)
        offset = 0 if state is None else state.k.shape[2]
        if self.d_conv > 0:
            conv_out = ops.causal_conv1d(
                qkv, self.conv1d.weight[:, 0, :], self.conv1d.bias, seq_idx=seq_idx,
                initial_states=None if state is None else state.conv, return_final_states=state is not None,
                activation=None, impl=self.impl)
            if state is not None:
                qkv, state.conv = conv_out
                state.conv = state.conv.to(qkv.dtype)
            else:
                qkv = conv_out
        q, k, v = qkv.split([self.num_heads * self.head_dim, self.num_heads_kv * self.head_dim,
                             self.num_heads_kv * self.head_dim], dim=-1)
        q = q.view(b, L, self.num_heads, self.head_dim)
        k = k.view(b, L, self.num_heads_kv, self.head_dim)
        v = v.view(b, L, self.num_heads_kv, self.head_dim)
        pos = rotary_positions(seq_idx, b, L, x.device) + offset
        q = apply_rotary(q, pos, self.rotary_dim, self.rotary_base)
        k = apply_rotary(k, pos, self.rotary_dim, self.rotary_base)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if state is not None:
            k = torch.cat([state.k, k], dim=2)
            v = torch.cat([state.v, v], dim=2)
            state.k, state.v = k, v
        mask, is_causal = None, True
        if seq_idx is not None or offset > 0:
            Lk = k.shape[2]
            causal = torch.ones(L, Lk, dtype=torch.bool, device=x.device).tril(diagonal=Lk - L)
            mask = causal[None, None]
            if seq_idx is not None:
                if offset > 0:
                    raise NotImplementedError("seq_idx together with a non-empty KV cache is not supported")
                mask = mask & (seq_idx[:, None, :, None] == seq_idx[:, None, None, :])
            is_causal = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             scale=self.softmax_scale,
                                             enable_gqa=self.num_heads != self.num_heads_kv)
        out = out.transpose(1, 2).reshape(b, L, self.num_heads * self.head_dim)
        if self.mlp_dim > 0:
            out = torch.cat([out, x_mlp], dim=-1)
        return self.out_proj(out)

    def step(self, x, state: KVCache, pos: DecodePositions):
        """One token per row, x: (batch, d_model), into a fixed-size cache (state.k: (batch, heads_kv, max_len,
        head_dim)) at slot pos.cache_pos; keys before pos.kv_start (left padding) are masked out."""
        b = x.shape[0]
        qkv = self.in_proj(x)
        if self.mlp_dim > 0:
            qkv, x_mlp = qkv.split([self.qkv_dim, self.mlp_dim], dim=-1)
            up, gate = x_mlp.chunk(2, dim=-1)
            x_mlp = up * F.silu(gate)
        if self.d_conv > 0:
            qkv = conv_step(qkv, state.conv, self.conv1d.weight[:, 0, :], self.conv1d.bias, None, self.impl)
        q, k, v = qkv.split([self.num_heads * self.head_dim, self.num_heads_kv * self.head_dim,
                             self.num_heads_kv * self.head_dim], dim=-1)
        p = pos.positions[:, None]
        q = apply_rotary(q.view(b, 1, self.num_heads, self.head_dim), p, self.rotary_dim, self.rotary_base)
        k = apply_rotary(k.view(b, 1, self.num_heads_kv, self.head_dim), p, self.rotary_dim, self.rotary_base)
        v = v.view(b, 1, self.num_heads_kv, self.head_dim)
        slot = pos.cache_pos.view(1)
        state.k.index_copy_(2, slot, k.transpose(1, 2).to(state.k.dtype))
        state.v.index_copy_(2, slot, v.transpose(1, 2).to(state.v.dtype))
        ar = torch.arange(state.k.shape[2], device=x.device)
        mask = (ar[None, :] >= pos.kv_start[:, None]) & (ar[None, :] <= pos.cache_pos)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), state.k, state.v, attn_mask=mask[:, None, None, :],
                                             scale=self.softmax_scale,
                                             enable_gqa=self.num_heads != self.num_heads_kv)
        out = out.transpose(1, 2).reshape(b, self.num_heads * self.head_dim)
        if self.mlp_dim > 0:
            out = torch.cat([out, x_mlp], dim=-1)
        return self.out_proj(out)


class GatedMLP(nn.Module):
    def __init__(self, d_model: int, d_intermediate: int, multiple_of: int = 128):
        super().__init__()
        hidden = (d_intermediate + multiple_of - 1) // multiple_of * multiple_of
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d_model, bias=False)

    def reset_parameters(self):
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def forward(self, x):
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * F.silu(gate))


class Block(nn.Module):
    """Pre-norm residual block: residual += mixer(norm(residual)); then, if present, the same with an MLP."""

    def __init__(self, config: Mamba2Config, layer_idx: int):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, config.norm_epsilon)
        self.mixer = (Attention(config, layer_idx) if layer_idx in config.attn_layer_idx
                      else Mamba2Mixer(config, layer_idx))
        if config.d_intermediate > 0:
            self.norm2 = RMSNorm(config.d_model, config.norm_epsilon)
            self.mlp = GatedMLP(config.d_model, config.d_intermediate)
        else:
            self.norm2 = self.mlp = None

    def _add(self, hidden, residual):
        if hidden is None:  # a fused step already added its output to the residual
            return residual
        if isinstance(hidden, UnscaledHidden):
            dtype = self._residual_dtype(hidden, residual)
            return (hidden.scaled() + (0 if residual is None else at_least_fp32(residual))).to(dtype)
        residual = hidden if residual is None else residual + hidden
        return at_least_fp32(residual) if self.residual_in_fp32 else residual

    def forward(self, hidden, residual=None, seq_idx=None, state=None):
        residual = self._add(hidden, residual)
        hidden = self.mixer(self.norm(residual.to(self.norm.weight.dtype)), seq_idx=seq_idx, state=state)
        if self.mlp is not None:
            residual = self._add(hidden, residual)
            hidden = self.mlp(self.norm2(residual.to(self.norm2.weight.dtype)))
        return hidden, residual

    def _residual_dtype(self, hidden, residual):
        if hidden is None:
            return residual.dtype
        raw = hidden.raw if isinstance(hidden, UnscaledHidden) else hidden
        return at_least_fp32(raw).dtype if self.residual_in_fp32 else raw.dtype

    def _add_norm(self, hidden, residual, norm):
        """residual += hidden (hidden None: already added; an UnscaledHidden: scaled first); norm(residual): one
        fused kernel when decoding on CUDA."""
        unscaled = isinstance(hidden, UnscaledHidden)
        if _step_on_triton(residual if hidden is None else hidden.raw if unscaled else hidden, self.mixer.impl):
            from lit_mamba2.kernels.state_update import add_rmsnorm

            if hidden is None:
                hidden, residual = residual, None
            rms = None
            if unscaled:
                hidden, rms = hidden.raw, (hidden.sumsq, hidden.dim, hidden.eps)
            return add_rmsnorm(hidden, residual, norm.weight, norm.eps, self._residual_dtype(hidden, residual),
                               hidden_rms=rms)
        residual = self._add(hidden, residual)
        return norm(residual.to(norm.weight.dtype)), residual

    def step(self, hidden, residual, state, pos=None, fuse_linear: bool = False, fold_gated_norm: bool = False):
        """One token per row. Returns (hidden, residual); hidden is None when a fused step already added the
        mixer's output to the residual (fuse_linear: see Mamba2Mixer.fused_step), and an UnscaledHidden when the
        mixer's gated norm was folded (fold_gated_norm: see Mamba2Mixer.step; the next add+norm finishes it)."""
        m = self.mixer
        if fuse_linear and isinstance(m, Mamba2Mixer) and m.can_fuse_linear(residual if hidden is None else hidden):
            residual = m.fused_step(hidden, residual, self.norm, state, pos, self._residual_dtype(hidden, residual))
            hidden = None
        else:
            normed, residual = self._add_norm(hidden, residual, self.norm)
            hidden = (m.step(normed, state, pos, fold_norm=fold_gated_norm) if isinstance(m, Mamba2Mixer)
                      else m.step(normed, state, pos))
        if self.mlp is not None:
            normed, residual = self._add_norm(hidden, residual, self.norm2)
            hidden = self.mlp(normed)
        return hidden, residual


class Backbone(nn.Module):
    def __init__(self, config: Mamba2Config):
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, config.norm_epsilon)

    def forward(self, input_ids, seq_idx=None, states=None):
        hidden, residual = self.embedding(input_ids), None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, seq_idx=seq_idx, state=None if states is None else states[i])
        residual = hidden if residual is None else residual + hidden
        return self.norm_f(residual.to(self.norm_f.weight.dtype))

    def step(self, input_ids, states, pos=None, fuse_linear: bool = False, fold_gated_norm: bool = False):
        """Returns (hidden, residual) after the last layer, before the final norm (hidden None: in residual; an
        UnscaledHidden: the last mixer's gated norm folded)."""
        hidden, residual = self.embedding(input_ids), None
        for layer, state in zip(self.layers, states):
            hidden, residual = layer.step(hidden, residual, state, pos, fuse_linear, fold_gated_norm)
        return hidden, residual


class Mamba2LMHeadModel(nn.Module):
    """A causal language model: embedding, n_layer blocks, final norm, LM head (tied to the embedding by default)."""

    def __init__(self, config: Mamba2Config):
        super().__init__()
        if not isinstance(config, Mamba2Config):
            raise TypeError(f"Mamba2LMHeadModel takes a Mamba2Config, got {type(config).__name__}")
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """mamba_ssm's initialisation: embedding N(0, 0.02); out_proj and fc2 rescaled by 1/sqrt(n_residuals · n_layer)."""
        cfg = self.config
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters") and not isinstance(module, nn.Linear):
                if isinstance(module, (Mamba2Mixer, Attention, GatedMLP, RMSNorm, GatedRMSNorm, nn.Embedding)):
                    module.reset_parameters()
        nn.init.normal_(self.backbone.embedding.weight, std=cfg.initializer_range)
        if not cfg.tie_embeddings:
            self.lm_head.reset_parameters()
        n_residuals = 1 if cfg.d_intermediate == 0 else 2
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight") or name.endswith("fc2.weight"):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                p /= math.sqrt(n_residuals * cfg.n_layer)

    def set_impl(self, impl: Optional[str]) -> "Mamba2LMHeadModel":
        """Force the ops' implementation ("torch", "triton") for every layer; None picks by device."""
        if impl not in ops.IMPLS:
            raise ValueError(f"impl must be one of {ops.IMPLS}, got {impl!r}")
        for m in self.modules():
            if hasattr(m, "impl"):
                m.impl = impl
        return self

    def allocate_states(self, batch: int, device=None, dtype=None) -> list:
        """An empty recurrent state per layer (Mamba2State, or an empty KVCache for attention layers)."""
        device = device or self.lm_head.weight.device
        dtype = dtype or self.lm_head.weight.dtype
        states = []
        for layer in self.backbone.layers:
            m = layer.mixer
            if isinstance(m, Mamba2Mixer):
                states.append(m.empty_state(batch, device, dtype))
            else:
                empty = torch.zeros(batch, m.num_heads_kv, 0, m.head_dim, device=device, dtype=dtype)
                conv = (torch.zeros(batch, m.qkv_dim, m.d_conv - 1, device=device, dtype=dtype)
                        if m.d_conv > 0 else None)
                states.append(KVCache(empty, empty.clone(), conv))
        return states

    def forward(self, input_ids, seq_idx=None, states=None):
        """input_ids: (batch, seqlen) int64; seq_idx: optional int32 (batch, seqlen) document ids.
        Returns logits (batch, seqlen, padded_vocab_size). With `states` (from allocate_states), they carry the
        recurrent state in and out, for prefill and decoding."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (batch, seqlen) tensor, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must hold at least one token per row, got shape {tuple(input_ids.shape)}")
        if seq_idx is not None:
            if not isinstance(seq_idx, torch.Tensor) or seq_idx.shape != input_ids.shape:
                raise ValueError(f"seq_idx shape {tuple(getattr(seq_idx, 'shape', ()))} must equal input_ids "
                                 f"shape {tuple(input_ids.shape)}")
            if seq_idx.dtype != torch.int32:
                raise TypeError(f"seq_idx must be int32 (document ids), got {seq_idx.dtype}")
        hidden = self.backbone(input_ids, seq_idx=seq_idx, states=states)
        return self.lm_head(hidden.to(self.lm_head.weight.dtype))

    def step(self, input_ids, states, pos: Optional[DecodePositions] = None, fuse_linear: bool = False,
             fold_gated_norm: bool = False):
        """One decoding step: input_ids (batch,) -> logits (batch, padded_vocab_size). `states` are advanced in
        place; attention layers need fixed-size caches and `pos` (see generation.py, which prepares both).
        fuse_linear: on the Triton path, norms ride in the linear layers' prologues (kernels/decode_linear.py;
        for small batches, where launches dominate). fold_gated_norm: on the Triton path, each Mamba-2 mixer's
        gated norm rides in its state kernel and the next add+norm (Mamba2Mixer.step; not with fuse_linear)."""
        if fuse_linear and fold_gated_norm:
            raise ValueError("fuse_linear and fold_gated_norm exclude each other: the fused GEMVs carry the gated "
                             "norm in out_proj's prologue already")
        if pos is None and self.config.attn_layer_idx:
            raise ValueError("step: a model with attention layers needs `pos` (the decode positions) beside its "
                             "KV caches; generation.Decoder prepares both")
        hidden, residual = self.backbone.step(input_ids, states, pos, fuse_linear, fold_gated_norm)
        last = self.backbone.layers[-1]
        if fuse_linear and _step_on_triton(residual, last.mixer.impl):
            from lit_mamba2.kernels.decode_linear import add_norm_linear

            norm = self.backbone.norm_f
            return add_norm_linear(hidden, residual, norm.weight, norm.eps, self.lm_head.weight)[0]
        hidden = last._add_norm(hidden, residual, self.backbone.norm_f)[0]
        return self.lm_head(hidden.to(self.lm_head.weight.dtype))

    def loss(self, input_ids, labels, seq_idx=None, ignore_index: int = -100, reduction: str = "mean"):
        """Cross-entropy of the logits at each position against labels at the same position (labels are the
        already-shifted next tokens; ignore_index marks positions that do not count). The one loss entry point.
        reduction "mean" / "sum" take the fused LM head + loss kernel where Triton runs; "none" returns the
        (batch, seqlen) losses (0 where ignored) through the unfused head."""
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        hidden = self.backbone(input_ids, seq_idx=seq_idx).to(self.lm_head.weight.dtype)
        # the LM head fused with the loss (never the full float32 logits) where the Triton kernels run; the
        # layers' impl (set_impl) forces either path
        impl = next((m.impl for m in self.modules() if hasattr(m, "impl")), None)
        if reduction != "none" and ops._choose(impl, hidden, op="loss") == "triton":
            from lit_mamba2.kernels.cross_entropy import linear_cross_entropy

            # the kernel reads the label's logit unchecked; F.cross_entropy refuses such labels (on a GPU with a
            # device-side assert, as this is: no host sync)
            V = self.lm_head.weight.shape[0]
            torch._assert_async(((labels == ignore_index) | ((labels >= 0) & (labels < V))).all(),
                                f"loss: a label is outside [0, {V}) and not ignore_index ({ignore_index})")
            return linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, labels.flatten(),
                                        ignore_index=ignore_index, reduction=reduction)
        logits = self.lm_head(hidden)
        if logits.dtype != torch.float64:
            logits = logits.float()
        out = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=ignore_index, reduction=reduction)
        return out.view_as(labels) if reduction == "none" else out  # "none": one loss per position, (batch, seqlen)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, name_or_path, *, revision=None, dtype=None, device=None,
                        tokenizer=None) -> "Mamba2LMHeadModel":
        """A mamba_ssm- or transformers-format folder, a Hub repo id, or a training .ckpt (see checkpoints.py)."""
        from lit_mamba2.checkpoints import from_pretrained

        return from_pretrained(name_or_path, revision=revision, dtype=dtype, device=device, tokenizer=tokenizer)

    def save_pretrained(self, folder, format: str = "hf", tokenizer=None):
        """Write a folder that transformers ("hf") or mamba_ssm ("mamba_ssm") loads as it is."""
        from lit_mamba2.checkpoints import save_pretrained

        return save_pretrained(self, folder, format=format, tokenizer=tokenizer)
