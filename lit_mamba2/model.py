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


@dataclass
class KVCache:
    """An attention layer's keys and values so far, each key's document and position within it (so that a later
    chunk or step masks other documents and continues the rotary positions), and the conv state of a short conv."""

    k: torch.Tensor  # (batch, num_heads_kv, seqlen, head_dim)
    v: torch.Tensor
    doc: torch.Tensor  # (batch, seqlen) int32
    pos: torch.Tensor  # (batch, seqlen) int64
    conv: Optional[torch.Tensor] = None  # (batch, qkv_dim, d_conv - 1)


def document_positions(seq_idx: Optional[torch.Tensor], b: int, L: int, device) -> torch.Tensor:
    """Each token's position within its own document (rotary restarts per document, so packing never shifts a
    document's phases). seq_idx None: one document per row."""
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
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    angles = pos.to(cdt)[..., None] * inv_freq.to(cdt)  # (b, L, dim/2)
    cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]
    x_rot, x_pass = x[..., :dim].to(cdt), x[..., dim:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, x_pass], dim=-1)


class Mamba2Mixer(nn.Module):
    """in_proj -> [z0, x0, z, xBC, dt]; causal conv1d + SiLU over xBC = [x, B, C]; SSD; D skip; gated RMSNorm;
    [silu(z0) * x0, y] -> out_proj. The segment sizes are this module's attributes, so that a tensor-parallel plan
    may shard each segment and set the local sizes."""

    def __init__(self, config: Mamba2Config, layer_idx: int = 0):
        super().__init__()
        s = config.ssm
        self.layer_idx = layer_idx
        self.d_model, self.d_ssm = config.d_model, config.d_ssm
        self.d_mlp = config.d_inner - config.d_ssm  # channels that skip the SSM (d_ssm < d_inner)
        self.headdim, self.ngroups, self.d_state = s.headdim, s.ngroups, s.d_state
        self.nheads = config.nheads
        self.d_conv, self.chunk_size = s.d_conv, s.chunk_size
        self.dt_limit = s.dt_limit
        self.D_has_hdim = s.D_has_hdim
        self.conv_dim = self.d_ssm + 2 * self.ngroups * self.d_state
        # initialisation (reset_parameters)
        self.dt_range, self.dt_init_floor = (s.dt_min, s.dt_max), s.dt_init_floor
        self.A_init_range, self.conv_init = s.A_init_range, s.conv_init
        self.in_proj = nn.Linear(self.d_model, 2 * self.d_mlp + self.d_ssm + self.conv_dim + self.nheads,
                                 bias=s.bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.d_conv, groups=self.conv_dim,
                                padding=self.d_conv - 1, bias=s.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.d_ssm if self.D_has_hdim else self.nheads))
        self.norm = (GatedRMSNorm(self.d_ssm, config.norm_epsilon, self.d_ssm // self.ngroups, s.norm_before_gate)
                     if s.rmsnorm else None)
        self.out_proj = nn.Linear(self.d_mlp + self.d_ssm, self.d_model, bias=s.bias)
        self.impl: Optional[str] = None
        self.context = None  # context parallelism (lit_mamba2.parallel.context) runs the ops in place of `ops`
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        self.in_proj.reset_parameters()
        self.conv1d.reset_parameters()
        if self.conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -self.conv_init, self.conv_init)
        self.out_proj.reset_parameters()
        for lin in (self.in_proj, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        # dt log-uniform in dt_range; dt_bias is its inverse softplus so that softplus(dt_bias) = dt
        log_lo, log_hi = (math.log(v) for v in self.dt_range)
        dt = torch.exp(torch.rand(self.dt_bias.shape, device=self.dt_bias.device) * (log_hi - log_lo) + log_lo)
        dt = dt.clamp(min=self.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(*self.A_init_range)))
        nn.init.ones_(self.D)
        if self.norm is not None:
            self.norm.reset_parameters()

    def empty_state(self, batch: int, device=None, dtype=None) -> Mamba2State:
        device = device or self.in_proj.weight.device
        dtype = dtype or self.in_proj.weight.dtype
        return Mamba2State(conv=torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
                           ssm=torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device,
                                           dtype=torch.float64 if dtype == torch.float64 else torch.float32))

    def _D(self):
        return self.D.view(self.nheads, self.headdim) if self.D_has_hdim else self.D

    def _split(self, zxbcdt):
        return torch.split(zxbcdt, [self.d_mlp, self.d_mlp, self.d_ssm, self.conv_dim, self.nheads], dim=-1)

    def _finish(self, y, z, z0, x0):
        """Gated norm, the channels beside the SSM, out_proj."""
        if self.norm is not None:
            y = self.norm(y, z)
        if self.d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    def forward(self, u, seq_idx=None, positions=None, state: Optional[Mamba2State] = None):
        """u: (batch, seqlen, d_model). With `state`, it is the state before u, and is replaced by the state after
        (one token with a state takes the recurrence, `step`). positions: unused (attention's)."""
        b, L, _ = u.shape
        if state is not None and L == 1:
            return self.step(u[:, 0], state)[:, None]
        z0, x0, z, xBC, dt = self._split(self.in_proj(u))
        run = ops if self.context is None else self.context
        conv_out = run.causal_conv1d(
            xBC, self.conv1d.weight[:, 0, :], self.conv1d.bias, seq_idx=seq_idx,
            initial_states=None if state is None else state.conv, return_final_states=state is not None,
            activation="silu", impl=self.impl)
        xBC, conv_state = conv_out if state is not None else (conv_out, None)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        A = -torch.exp(at_least_fp32(self.A_log))
        out = run.ssd(
            x.view(b, L, self.nheads, self.headdim), dt, A,
            B.view(b, L, self.ngroups, self.d_state), C.view(b, L, self.ngroups, self.d_state),
            self.chunk_size, D=self._D(), z=None if self.norm is not None else z.view(b, L, self.nheads, self.headdim),
            dt_bias=self.dt_bias, initial_states=None if state is None else state.ssm, seq_idx=seq_idx,
            dt_softplus=True, dt_limit=self.dt_limit, return_final_states=state is not None, impl=self.impl)
        if state is not None:
            y, ssm_state = out
            state.conv, state.ssm = conv_state.to(state.conv.dtype), ssm_state.to(state.ssm.dtype)
        else:
            y = out
        return self._finish(y.reshape(b, L, self.d_ssm), z, z0, x0)

    def step(self, u, state: Mamba2State):
        """The recurrence for one token per row: u (batch, d_model) -> (batch, d_model); `state` advances in place.
        The plain reference of the decode engine (lit_mamba2.inference)."""
        b = u.shape[0]
        z0, x0, z, xBC, dt = self._split(self.in_proj(u))
        xBC = ops.conv_step(xBC, state.conv, self.conv1d.weight[:, 0, :], self.conv1d.bias, "silu", impl=self.impl)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        y = ops.ssm_step(state.ssm, x.view(b, self.nheads, self.headdim), dt, self.A_log,
                         B.view(b, self.ngroups, self.d_state), C.view(b, self.ngroups, self.d_state), D=self._D(),
                         z=None if self.norm is not None else z.view(b, self.nheads, self.headdim),
                         dt_bias=self.dt_bias, dt_limit=self.dt_limit, impl=self.impl)
        return self._finish(y.reshape(b, self.d_ssm), z, z0, x0)


class Attention(nn.Module):
    """mamba_ssm's MHA for hybrids: GQA, rotary on the first rotary_emb_dim channels, optional short causal conv
    over qkv, optional gated MLP sharing in_proj/out_proj; packed documents masked (ops.attention)."""

    def __init__(self, config: Mamba2Config, layer_idx: int = 0):
        super().__init__()
        a = config.attn
        self.layer_idx = layer_idx
        self.num_heads, self.num_heads_kv, self.head_dim = a.num_heads, a.num_heads_kv, a.head_dim
        self.rotary_dim, self.rotary_base = a.rotary_emb_dim, a.rotary_emb_base
        self.softmax_scale, self.d_conv = a.softmax_scale, a.d_conv
        self.mlp_dim = math.ceil(a.mlp_dim / 256) * 256
        self.qkv_dim = self.head_dim * (self.num_heads + 2 * self.num_heads_kv)
        out_dim = self.head_dim * self.num_heads
        self.in_proj = nn.Linear(config.d_model, self.qkv_dim + self.mlp_dim, bias=a.qkv_proj_bias)
        if self.d_conv > 0:
            self.conv1d = nn.Conv1d(self.qkv_dim, self.qkv_dim, self.d_conv, padding=self.d_conv - 1,
                                    groups=self.qkv_dim)
        self.out_proj = nn.Linear(out_dim + self.mlp_dim // 2, config.d_model, bias=a.out_proj_bias)
        self.impl: Optional[str] = None
        self.context = None  # context parallelism (lit_mamba2.parallel.context) runs the ops in place of `ops`
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for m in (self.in_proj, self.out_proj):
            m.reset_parameters()
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        if self.d_conv > 0:
            self.conv1d.reset_parameters()

    def empty_state(self, batch: int, device=None, dtype=None) -> KVCache:
        device = device or self.in_proj.weight.device
        dtype = dtype or self.in_proj.weight.dtype
        empty = torch.zeros(batch, self.num_heads_kv, 0, self.head_dim, device=device, dtype=dtype)
        conv = (torch.zeros(batch, self.qkv_dim, self.d_conv - 1, device=device, dtype=dtype)
                if self.d_conv > 0 else None)
        return KVCache(empty, empty.clone(), torch.zeros(batch, 0, device=device, dtype=torch.int32),
                       torch.zeros(batch, 0, device=device, dtype=torch.long), conv)

    def forward(self, x, seq_idx=None, positions=None, state: Optional[KVCache] = None):
        """x: (batch, seqlen, d_model); positions: (batch, seqlen), each token's position within its document
        (None: from seq_idx); state: the keys and values before x, extended in place."""
        b, L, _ = x.shape
        qkv = self.in_proj(x)
        run = ops if self.context is None else self.context
        if self.mlp_dim > 0:
            qkv, x_mlp = qkv.split([self.qkv_dim, self.mlp_dim], dim=-1)
            up, gate = x_mlp.chunk(2, dim=-1)
            x_mlp = up * F.silu(gate)
        if self.d_conv > 0:
            conv_out = run.causal_conv1d(
                qkv, self.conv1d.weight[:, 0, :], self.conv1d.bias, seq_idx=seq_idx,
                initial_states=None if state is None else state.conv, return_final_states=state is not None,
                activation=None, impl=self.impl)
            if state is not None:
                qkv, conv_state = conv_out
                state.conv = conv_state.to(qkv.dtype)
            else:
                qkv = conv_out
        q, k, v = qkv.split([self.num_heads * self.head_dim, self.num_heads_kv * self.head_dim,
                             self.num_heads_kv * self.head_dim], dim=-1)
        if positions is None:
            positions = document_positions(seq_idx, b, L, x.device)
        q = apply_rotary(q.view(b, L, self.num_heads, self.head_dim), positions, self.rotary_dim, self.rotary_base)
        k = apply_rotary(k.view(b, L, self.num_heads_kv, self.head_dim), positions, self.rotary_dim,
                         self.rotary_base)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(b, L, self.num_heads_kv, self.head_dim).transpose(1, 2)
        doc_q = doc_k = seq_idx
        if state is not None:
            if doc_q is None:  # the tokens continue the cache's last document
                doc_q = (state.doc[:, -1:] if state.doc.shape[1] else state.doc.new_zeros(b, 1)).expand(b, L)
            k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
            doc_k = torch.cat([state.doc, doc_q], dim=1)
            state.k, state.v, state.doc = k, v, doc_k
            state.pos = torch.cat([state.pos, positions.to(state.pos.dtype)], dim=1)
        out = run.attention(q, k, v, doc_q=doc_q, doc_k=doc_k, scale=self.softmax_scale, impl=self.impl)
        out = out.transpose(1, 2).reshape(b, L, self.num_heads * self.head_dim)
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
    """Pre-norm residual block: residual += mixer(norm(residual)); then, if present, the same with an MLP.
    The residual stream is carried beside the hidden output (mamba_ssm's layout; in float32 with
    residual_in_fp32)."""

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
        residual = hidden if residual is None else residual + hidden
        return at_least_fp32(residual) if self.residual_in_fp32 else residual

    def forward(self, hidden, residual=None, seq_idx=None, positions=None, state=None):
        residual = self._add(hidden, residual)
        hidden = self.mixer(self.norm(residual.to(self.norm.weight.dtype)), seq_idx, positions, state)
        if self.mlp is not None:
            residual = self._add(hidden, residual)
            hidden = self.mlp(self.norm2(residual.to(self.norm2.weight.dtype)))
        return hidden, residual


class Backbone(nn.Module):
    def __init__(self, config: Mamba2Config):
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, config.norm_epsilon)

    def forward(self, input_ids, seq_idx=None, positions=None, states=None):
        hidden, residual = self.embedding(input_ids), None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, seq_idx, positions, None if states is None else states[i])
        residual = hidden if residual is None else residual + hidden
        return self.norm_f(residual.to(self.norm_f.weight.dtype))


def _residual_outputs(block: Block) -> list[nn.Module]:
    """The projections that write into the residual stream (rescaled at initialisation)."""
    return [block.mixer.out_proj] + ([block.mlp.fc2] if block.mlp is not None else [])


class Mamba2LMHeadModel(nn.Module):
    """A causal language model: embedding, n_layer blocks, final norm, LM head (tied to the embedding by default)."""

    def __init__(self, config: Mamba2Config):
        super().__init__()
        if not isinstance(config, Mamba2Config):
            raise TypeError(f"Mamba2LMHeadModel takes a Mamba2Config, got {type(config).__name__}")
        self.config = config
        # the seed init_weights draws from (explicitly on the CPU generator: also under torch.device("meta"))
        self.init_seed = int(torch.randint(0, 2**62, (), device="cpu"))
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None):
        """mamba_ssm's initialisation of every parameter: each mixer, MLP and norm its own (A_log from
        A_init_range, dt_bias from a log-uniform dt, D = 1), the embedding N(0, initializer_range), out_proj and
        fc2 kaiming-uniform rescaled by 1/sqrt(n_residuals · n_layer). Each part (`init_part`) draws from its own
        seed derived from `seed` (default `init_seed`, drawn from torch's generator when the model was built), so
        that a build which materialises and initialises one part at a time (a sharded one) gets the weights of a
        whole build on the same device type. For a model built on the meta device and materialised with
        to_empty, which unties the LM head: it is tied again here."""
        for part in range(self.config.n_layer + 1):
            self.init_part(part, seed)

    @torch.no_grad()
    def init_part(self, part: int, seed: Optional[int] = None):
        """Initialise part `part`: block `part` for part < n_layer; part n_layer is the rest (the embedding, the
        final norm and the LM head, tied again if tied)."""
        cfg = self.config
        seed = self.init_seed if seed is None else seed
        if part < cfg.n_layer:
            modules = list(self.backbone.layers[part].modules())
        else:
            if cfg.tie_embeddings:
                self.lm_head.weight = self.backbone.embedding.weight
            modules = [self.backbone.embedding, self.backbone.norm_f, self.lm_head]
        device = next(p for m in modules for p in m.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
            torch.manual_seed((seed + 1_000_003 * (part + 1)) % 2**63)
            for module in modules:
                if isinstance(module, (Mamba2Mixer, Attention, GatedMLP, RMSNorm, GatedRMSNorm)):
                    module.reset_parameters()
            if part == cfg.n_layer:
                nn.init.normal_(self.backbone.embedding.weight, std=cfg.initializer_range)
                if not cfg.tie_embeddings:
                    self.lm_head.reset_parameters()
                return
            n_residuals = 1 if cfg.d_intermediate == 0 else 2
            for module in modules:
                for name, p in module.named_parameters(recurse=False):
                    if name == "weight" and module in _residual_outputs(self.backbone.layers[part]):
                        nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                        p /= math.sqrt(n_residuals * cfg.n_layer)

    def set_impl(self, impl: Optional[str]) -> "Mamba2LMHeadModel":
        """Force the ops' implementation ("torch", "triton") for every layer; None picks by device."""
        if impl not in ops.IMPLS:
            raise ValueError(f"impl must be one of {ops.IMPLS}, got {impl!r}")
        for m in self.modules():
            if "impl" in m.__dict__:
                m.impl = impl
        return self

    @property
    def impl(self) -> Optional[str]:
        """The implementation set_impl forced (None: by device)."""
        return next((m.impl for m in self.modules() if "impl" in m.__dict__), None)

    def allocate_states(self, batch: int, device=None, dtype=None) -> list:
        """An empty recurrent state per layer (Mamba2State, or an empty KVCache for attention layers)."""
        device = device or self.lm_head.weight.device
        dtype = dtype or self.lm_head.weight.dtype
        return [layer.mixer.empty_state(batch, device, dtype) for layer in self.backbone.layers]

    def forward(self, input_ids, seq_idx=None, positions=None, states=None):
        """input_ids: (batch, seqlen) int64; seq_idx: optional int32 (batch, seqlen) document ids; positions:
        optional (batch, seqlen) int64, each token's position within its document (None: derived from seq_idx
        on the whole row, continuing the KV caches' documents). Returns logits (batch, seqlen, padded_vocab_size).
        With `states` (from allocate_states), they carry the recurrent state in and out, for prefill and decoding."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (batch, seqlen) tensor, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must hold at least one token per row, got shape {tuple(input_ids.shape)}")
        for name, t, dtypes in (("seq_idx", seq_idx, (torch.int32,)), ("positions", positions, (torch.int64,))):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.shape != input_ids.shape:
                raise ValueError(f"{name} shape {tuple(getattr(t, 'shape', ()))} must equal input_ids shape "
                                 f"{tuple(input_ids.shape)}")
            if t.dtype not in dtypes:
                raise TypeError(f"{name} must be {str(dtypes[0]).split('.')[-1]}, got {t.dtype}")
        if states is not None and len(states) != len(self.backbone.layers):
            raise ValueError(f"states: one per layer ({len(self.backbone.layers)}), got {len(states)}")
        if positions is None and self.config.attn_layer_idx:
            positions = self._positions(input_ids, seq_idx, states)
        hidden = self.backbone(input_ids, seq_idx=seq_idx, positions=positions, states=states)
        return self.lm_head(hidden.to(self.lm_head.weight.dtype))

    def _positions(self, input_ids, seq_idx, states):
        """Positions within documents from seq_idx; tokens of the document a KV cache ends with continue it."""
        b, L = input_ids.shape
        positions = document_positions(seq_idx, b, L, input_ids.device)
        cache = next((s for s in states or () if isinstance(s, KVCache)), None)
        if cache is None or cache.pos.shape[1] == 0:
            return positions
        last_doc, next_pos = cache.doc[:, -1:], cache.pos[:, -1:] + 1
        if seq_idx is None:
            return positions + next_pos
        return positions + torch.where(seq_idx == last_doc, next_pos, torch.zeros_like(next_pos))

    def step(self, input_ids, states, positions=None):
        """One token per row: input_ids (batch,) -> logits (batch, padded_vocab_size); `states` advance (the
        recurrence for Mamba-2 layers, a growing KV cache for attention). The plain reference of the decode
        engine in lit_mamba2.inference, which generation uses."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1:
            raise ValueError(f"step: input_ids must be a (batch,) tensor, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        return self(input_ids[:, None], positions=None if positions is None else positions[:, None],
                    states=states)[:, 0]

    def loss(self, input_ids, labels, seq_idx=None, positions=None, ignore_index: int = -100,
             reduction: str = "mean"):
        """Cross-entropy of the logits at each position against labels at the same position (labels are the
        already-shifted next tokens; ignore_index marks positions that do not count). The one loss entry point.
        reduction "mean" / "sum" take the fused LM head + loss kernel where Triton runs; "none" returns the
        (batch, seqlen) losses (0 where ignored) through the unfused head."""
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if positions is None and self.config.attn_layer_idx:
            positions = document_positions(seq_idx, *input_ids.shape, input_ids.device)
        hidden = self.backbone(input_ids, seq_idx=seq_idx, positions=positions).to(self.lm_head.weight.dtype)
        if reduction != "none":
            # (a tensor-parallel plan leaves the LM head a slice of the vocabulary and names its group)
            return ops.linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, labels.flatten(),
                                            ignore_index=ignore_index, reduction=reduction,
                                            vocab_group=getattr(self.lm_head, "vocab_group", None), impl=self.impl)
        logits = self.lm_head(hidden)
        if logits.dtype != torch.float64:
            logits = logits.float()
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=ignore_index,
                               reduction="none").view_as(labels)  # one loss per position, (batch, seqlen)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, name_or_path, *, revision=None, dtype=None, device=None) -> "Mamba2LMHeadModel":
        """The model of a mamba_ssm- or transformers-format folder, a Hub repo id, or a training .ckpt, in eval
        mode. `lit_mamba2.checkpoints.load(Mamba2LMHeadModel, ...)` also returns its tokenizer and format."""
        from lit_mamba2.checkpoints import load  # (checkpoints builds `cls` and never imports this module)

        return load(cls, name_or_path, revision=revision, dtype=dtype, device=device, tokenizer=False).model

    def save_pretrained(self, folder, format: str = "hf", tokenizer=None):
        """Write a folder that transformers ("hf") or mamba_ssm ("mamba_ssm") loads as it is, with `tokenizer`
        ("byte", a name or folder, a Tokenizer or a transformers tokenizer) beside the weights if given."""
        from lit_mamba2.checkpoints import save

        return save(self, folder, format=format, tokenizer=tokenizer)
