"""Context parallelism: each row of a batch cut into contiguous slices, one per rank of the cp group, through every
layer. State passing (the paper's §8, LASP-2's all-gather): no zigzag reordering, since an SSM's state needs each
slice to follow the one before it.

`apply_context_parallel(model, group)` sets a `ContextParallel` as every mixer's `context`; the mixer then calls its
`causal_conv1d`, `ssd` and `attention` in place of lit_mamba2.ops' (same arguments, for the local slice), which
exchange what crosses the slice boundaries:

- the short convs (Mamba-2's xBC, attention's qkv) take the previous rank's last d_conv - 1 inputs as their initial
  state (the halo; taps from another document are cut), and return the halo's gradient to that rank;
- SSD: each rank runs its slice from a zero state. A slice is affine in the state h_in entering it: it leaves
  `a · h_in + S` (a = exp(Σ dt·A) over the slice, 0 if a document starts in it; S its final state from zero), and
  its output gains `exp(Σ_{s≤t} dt_s·A) · C_t · h_in` at the positions of h_in's document. The fp32 summaries
  (log a, S) of every rank are all-gathered in one collective and each rank scans those before it; the backward
  all-gathers the incoming states' gradients and scans in reverse (`_PassStates`). The correction term costs one
  (L × dstate) · (dstate × nheads·headdim) product per slice, a fraction of a second SSD pass (the other choice,
  rerunning SSD with initial_states, doubles the layer's SSD time), and its backward recomputes it instead of
  keeping a (L, nheads, headdim) float32 tensor (`_AddIncomingState`);
- attention: K and V all-gathered (their gradients reduce-scattered back), the queries at their offset in the row;
  the rows' document ids (seq_idx) are gathered once per batch and mask across ranks.

The caller gives each rank its slice of input_ids, labels, seq_idx and `positions` computed on the whole row
(`slice_batch`): rotary phases and documents are the row's, not the slice's. Parameters are the same on every cp
rank; their gradients are each rank's share, summed (averaged) over dp_shard × cp by FSDP.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lit_mamba2 import ops, reference
from lit_mamba2.model import Attention, Mamba2LMHeadModel, Mamba2Mixer, document_positions

INF = math.inf


def apply_context_parallel(model: Mamba2LMHeadModel, group=None) -> Mamba2LMHeadModel:
    """Make every mixer of `model` run on its rank's slice of each row, exchanging boundary states over `group`
    (default: the world). In place; returns the model."""
    context = ContextParallel(group)
    for module in model.modules():
        if isinstance(module, (Mamba2Mixer, Attention)):
            module.context = context
    if model.config.attn_layer_idx:  # positions derived from a slice would restart the rotary phases at the slice
        for name in ("forward", "loss"):  # (over FSDP's own wrappers of these methods, if applied)
            setattr(model, name, _requiring_positions(getattr(model, name), getattr(Mamba2LMHeadModel, name)))
    return model


def _requiring_positions(method, unbound):
    signature = inspect.signature(unbound)

    @functools.wraps(method)
    def checked(*args, **kwargs):
        if signature.bind(None, *args, **kwargs).arguments.get("positions") is None:
            raise ValueError("context parallel: the model needs `positions` (each token's position in its "
                             "document, computed on the whole row before slicing: "
                             "lit_mamba2.parallel.context.slice_batch)")
        return method(*args, **kwargs)
    return checked


def slice_batch(batch: dict, rank: int, size: int) -> dict:
    """Rank `rank` of `size`'s contiguous slice of every (batch, seqlen) tensor of `batch` (input_ids, labels,
    seq_idx), and of `positions`, computed on the whole rows first."""
    ids = batch["input_ids"]
    b, L = ids.shape
    if L % size:
        raise ValueError(f"context parallel: the sequence length {L} is not divisible by parallel.cp = {size}")
    out = dict(batch, positions=document_positions(batch.get("seq_idx"), b, L, ids.device))
    n = L // size
    for key, t in out.items():
        if isinstance(t, torch.Tensor) and t.shape[:2] == (b, L):
            out[key] = t[:, rank * n:(rank + 1) * n]
    return out


class ContextParallel:
    """The ops of a mixer whose input is one contiguous slice of each row, the cp group's rank-th (see the module
    docstring). Every rank of the group must call the same ops in the same order with slices of one length."""

    def __init__(self, group=None):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self._docs_of: Optional[torch.Tensor] = None  # the local seq_idx the gathered rows belong to
        self._docs: Optional[torch.Tensor] = None

    def documents(self, seq_idx: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The whole rows' seq_idx (batch, size · slice), gathered once per batch: every layer of one forward gets
        the same tensor, and a new batch is a new tensor."""
        if seq_idx is None:
            return None
        if seq_idx is not self._docs_of:
            self._docs = _gather(seq_idx, self.group, dim=1)
            self._docs_of = seq_idx
        return self._docs

    def _last_documents(self, seq_idx, L):
        """(batch, size): the document each rank's slice ends in (None: one document per row)."""
        docs = self.documents(seq_idx)
        return None if docs is None else docs[:, L - 1::L]

    # ---------------------------------------------------------------------------------------------------------
    def causal_conv1d(self, x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                      activation="silu", *, impl=None):
        if initial_states is not None or return_final_states:
            raise ValueError("context parallel: causal_conv1d with states (decoding) is not supported")
        b, L, d = x.shape
        halo_len = weight.shape[1] - 1
        if halo_len > L:
            raise ValueError(f"context parallel: slices of {L} positions are shorter than the conv's halo "
                             f"({halo_len}); use fewer cp ranks or longer sequences")
        halo = None
        if halo_len > 0:
            halo = _Halo.apply(x[:, L - halo_len:], self.group, self.rank, self.size)  # (b, halo_len, d)
            docs = self.documents(seq_idx)
            if docs is not None and self.rank > 0:  # taps of another document than the slice's first are cut
                start = self.rank * L
                same = docs[:, start - halo_len:start] == seq_idx[:, :1]
                halo = halo * same[..., None].to(halo.dtype)
            halo = halo.transpose(1, 2)
        return ops.causal_conv1d(x, weight, bias, seq_idx=seq_idx, initial_states=halo, activation=activation,
                                 impl=impl)

    def ssd(self, x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
            dt_softplus=False, dt_limit=(0.0, INF), return_final_states=False, *, impl=None):
        if initial_states is not None or return_final_states:
            raise ValueError("context parallel: ssd with states (decoding, chunked prefill) is not supported")
        b, L, h, p = x.shape
        # z gates after the incoming state's term is added: applied here, not in the op
        y, final = ops.ssd(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, seq_idx=seq_idx,
                           dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=True, impl=impl)
        cdt = final.dtype  # float32 (float64 for a float64 model)
        # Σ_{s≤t} dt_s·A over up to 10^5 positions: summed in float64 (a float32 running sum would drift by
        # ~sqrt(L)·ulp of the total; the op's kernels sum within chunks only)
        log_decay = torch.cumsum(reference.process_dt(dt, dt_bias, dt_softplus, dt_limit, cdt) * A.to(cdt), dim=1,
                                 dtype=torch.float64).to(cdt)
        last_docs = self._last_documents(seq_idx, L)
        # keep[j]: the state entering rank j's slice survives it (no document starts in the slice)
        keep = torch.ones(self.size, b, dtype=cdt, device=x.device)
        if last_docs is not None:
            keep[1:] = (last_docs[:, 1:] == last_docs[:, :-1]).T.to(cdt)
        h_in = _PassStates.apply(log_decay[:, -1], final, keep, self.group, self.rank, self.size)
        # the incoming state reaches the positions of the document it belongs to (none on rank 0)
        if self.rank == 0:
            reach = torch.zeros(b, L, dtype=cdt, device=x.device)
        elif last_docs is None:
            reach = torch.ones(b, L, dtype=cdt, device=x.device)
        else:
            reach = (seq_idx == last_docs[:, self.rank - 1:self.rank]).to(cdt)
        y = _AddIncomingState.apply(y, C, h_in, torch.exp(log_decay) * reach[..., None])
        if z is not None:
            y = (y.to(cdt) * F.silu(z.to(cdt))).to(x.dtype)
        return y

    def attention(self, q, k, v, *, doc_q=None, doc_k=None, q_offset=None, scale=None, impl=None):
        L = q.shape[2]
        if k.shape[2] != L or q_offset not in (None, 0):
            raise ValueError("context parallel: attention over a KV cache (decoding) is not supported")
        kv = _GatherSequence.apply(torch.stack([k, v]), self.group, self.size, 3)  # (2, b, hk, size · L, d)
        doc_q = doc_q if doc_q is not None else doc_k  # (the slice's documents)
        return ops.attention(q, kv[0], kv[1], doc_q=doc_q, doc_k=self.documents(doc_q), q_offset=self.rank * L,
                             scale=scale, impl=impl)


# -------------------------------------------------------------------------------------------------------------
# collectives and their autograd
# -------------------------------------------------------------------------------------------------------------
def _gather_stacked(t: torch.Tensor, group, size: int) -> torch.Tensor:
    """(size, *t.shape): every rank's t, by rank."""
    out = t.new_empty(size * t.shape[0], *t.shape[1:])  # (the concatenated form: gloo takes only that one)
    dist.all_gather_single(out, t.contiguous(), group=group)
    return out.view(size, *t.shape)


def _gather(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Every rank's t concatenated along dim, in rank order (no autograd)."""
    every = _gather_stacked(t, group, dist.get_world_size(group))
    return every.movedim(0, dim).flatten(dim, dim + 1)


class _GatherSequence(torch.autograd.Function):
    """All-gather along `dim`; the backward reduce-scatters (sums) each rank's part of the gradient back to it."""

    @staticmethod
    def forward(ctx, t, group, size, dim):
        ctx.group, ctx.size, ctx.dim = group, size, dim
        return _gather_stacked(t, group, size).movedim(0, dim).flatten(dim, dim + 1)

    @staticmethod
    def backward(ctx, grad):
        dim, size = ctx.dim, ctx.size
        parts = grad.unflatten(dim, (size, grad.shape[dim] // size)).movedim(dim, 0).contiguous()
        out = parts.new_empty(parts.shape[1:])
        dist.reduce_scatter_single(out, parts.flatten(0, 1), group=ctx.group)
        return out, None, None, None


class _Halo(torch.autograd.Function):
    """The previous rank's `tail` (its last positions; zeros on rank 0). Backward: the halo's gradient goes back to
    the rank it came from. One all-gather each way: the tails are a few positions, and a collective keeps every
    rank's calls alike."""

    @staticmethod
    def forward(ctx, tail, group, rank, size):
        ctx.group, ctx.rank, ctx.size = group, rank, size
        every = _gather_stacked(tail, group, size)
        return every[rank - 1] if rank > 0 else torch.zeros_like(tail)

    @staticmethod
    def backward(ctx, grad):
        every = _gather_stacked(grad, ctx.group, ctx.size)
        return (every[ctx.rank + 1] if ctx.rank + 1 < ctx.size else torch.zeros_like(grad)), None, None, None


class _PassStates(torch.autograd.Function):
    """The state entering this rank's slice from the slices' summaries: H_0 = 0, H_{j+1} = a_j H_j + S_j with
    a_j = exp(log_decay_j) · keep_j. Returns H_rank. Backward: G_j = g_j + a_j G_{j+1} over the gathered incoming
    gradients g, so dS = G_{rank+1} and d log_decay = a · <G_{rank+1}, H_rank>."""

    @staticmethod
    def forward(ctx, log_decay, final, keep, group, rank, size):
        # log_decay (b, h), final (b, h, p, n): this slice's summary; keep (size, b): see ContextParallel.ssd
        b, h, p, n = final.shape
        summary = torch.cat([log_decay[..., None], final.flatten(2)], dim=-1)  # one collective for both
        every = _gather_stacked(summary, group, size)  # (size, b, h, 1 + p·n)
        decay = every[..., 0].exp() * keep[..., None]  # (size, b, h)
        states = every[..., 1:].unflatten(-1, (p, n))
        h_in = torch.zeros_like(final)
        for j in range(rank):
            h_in = decay[j, :, :, None, None] * h_in + states[j]
        ctx.save_for_backward(decay, h_in)
        ctx.group, ctx.rank, ctx.size = group, rank, size
        return h_in

    @staticmethod
    def backward(ctx, grad):
        decay, h_in = ctx.saved_tensors
        every = _gather_stacked(grad, ctx.group, ctx.size)
        g_out = torch.zeros_like(h_in)  # the gradient of the state leaving this slice
        for j in range(ctx.size - 1, ctx.rank, -1):
            g_out = every[j] + decay[j, :, :, None, None] * g_out
        d_log_decay = (g_out * h_in).sum((-1, -2)) * decay[ctx.rank]
        return d_log_decay, g_out, None, None, None, None


def _readout(C, h_in):
    """C_t · h_in per head: C (b, L, g, n), h_in (b, h, p, n) -> (b, L, h, p), in h_in's dtype."""
    b, L, g, n = C.shape
    h, p = h_in.shape[1], h_in.shape[2]
    u = torch.einsum("blgn,bgkpn->blgkp", C.to(h_in.dtype), h_in.view(b, g, h // g, p, n))
    return u.reshape(b, L, h, p)


def _no_autocast(fn):
    """The state's products in its own dtype (float32) also under bf16 autocast."""
    @functools.wraps(fn)
    def wrapped(ctx, *args):
        with torch.autocast(args[0].device.type, enabled=False):
            return fn(ctx, *args)
    return wrapped


class _AddIncomingState(torch.autograd.Function):
    """y + weight_t · (C_t · h_in), weight (b, L, h) = exp(Σ_{s≤t} dt_s A) where h_in reaches, else 0. Computed in
    h_in's dtype, rounded once to y's; the product is recomputed in backward rather than kept."""

    @staticmethod
    @_no_autocast
    def forward(ctx, y, C, h_in, weight):
        ctx.save_for_backward(C, h_in, weight)
        return (y.to(h_in.dtype) + _readout(C, h_in) * weight[..., None]).to(y.dtype)

    @staticmethod
    @_no_autocast
    def backward(ctx, grad):
        C, h_in, weight = ctx.saved_tensors
        b, L, g, n = C.shape
        h, p = h_in.shape[1], h_in.shape[2]
        g32 = grad.to(h_in.dtype)
        d_weight = (g32 * _readout(C, h_in)).sum(-1)
        dv = (g32 * weight[..., None]).view(b, L, g, h // g, p)
        dC = torch.einsum("blgkp,bgkpn->blgn", dv, h_in.view(b, g, h // g, p, n)).to(C.dtype)
        dh = torch.einsum("blgkp,blgn->bgkpn", dv, C.to(h_in.dtype)).reshape(b, h, p, n)
        return grad, dC, dh, d_weight
