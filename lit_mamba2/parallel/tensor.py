"""Tensor parallelism applied to the model from outside: heads, channels and the vocabulary split over the ranks of a
tp group (Megatron's column-then-row pattern, one all-reduce per mixer and per MLP).

Every fused weight is cut by its own rule: the mixer's in_proj rows [z0, x0, z, x, B, C, dt] and its conv channels
[x, B, C] are segments, each split over the tp ranks on its own (`Layout`), so that a rank holds whole heads of every
segment and the mixer runs unchanged on its local sizes (its size attributes are set to them). B and C (ngroups
groups of d_state) split with the heads when `ngroups % tp == 0`; when `tp % ngroups == 0` (ngroups = 1: every
published checkpoint) each rank keeps its heads' group, the group's rank set shares it, and the gated norm's sum of
squares over a group is all-reduced across that set. Parameters stay plain tensors of the local shape (FSDP2 then
shards them over the data-parallel mesh as any other); `TensorParallel` (`model.tensor_parallel`) records each one's
layout, which turns them back into mamba_ssm's whole tensors for checkpoints (`to_full_layout`, `from_full_layout`),
and which the gradient steps need: the gradients of the pieces a set of ranks shares (replicated B/C rows and
channels) are summed over that set (`sync_replicated_grads`), and the clipping norm counts every element once
(`clip_grad_norm_`).

Communication per block: the row-parallel out_proj / fc2 all-reduce their output (forward), the column-parallel
in_proj / fc1 all-reduce their input's gradient (backward); with tp % ngroups == 0 and tp > ngroups the gated norm
adds a (batch, seqlen) all-reduce (forward and backward). The embedding and the LM head are split by vocabulary rows;
the loss takes the log-sum-exp across the shards (`vocab_parallel_cross_entropy`: the max and the sum of exps
all-reduced, never the whole logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lit_mamba2.config import Mamba2Config
from lit_mamba2.model import Attention, GatedMLP, GatedRMSNorm, Mamba2LMHeadModel, Mamba2Mixer
from lit_mamba2.parallel.dims import LayoutError


# ---------------------------------------------------------------------------------------------------------------
# Layouts: how a whole tensor's segments are cut along one dimension
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """`size` consecutive indices of the whole tensor, cut into `parts` equal pieces (parts divides tp): rank r holds
    piece r // (tp // parts), so tp // parts neighbouring ranks share each piece (parts = tp: split, 1: replicated)."""

    size: int
    parts: int


@dataclass(frozen=True)
class Layout:
    """A tensor whose dimension `dim` is the concatenation of `segments`; a rank holds its piece of each, in order."""

    dim: int
    segments: tuple[Segment, ...]
    tp: int

    def pieces(self, rank: int):
        """(whole start, local start, length, parts) of each piece rank `rank` holds."""
        out, start, local = [], 0, 0
        for s in self.segments:
            n = s.size // s.parts
            out.append((start + (rank // (self.tp // s.parts)) * n, local, n, s.parts))
            start, local = start + s.size, local + n
        return out

    @property
    def local_size(self) -> int:
        return sum(s.size // s.parts for s in self.segments)

    def shard(self, whole: torch.Tensor, rank: int) -> torch.Tensor:
        return torch.cat([whole.narrow(self.dim, a, n) for a, _, n, _ in self.pieces(rank)], dim=self.dim)

    def unshard(self, locals_: list[torch.Tensor]) -> torch.Tensor:
        """The whole tensor from every rank's local one (each piece from the first rank that holds it)."""
        out = []
        for i, s in enumerate(self.segments):
            for piece in range(s.parts):
                _, b, n, _ = self.pieces(piece * (self.tp // s.parts))[i]
                out.append(locals_[piece * (self.tp // s.parts)].narrow(self.dim, b, n))
        return torch.cat(out, dim=self.dim)

    def parts_along(self) -> torch.Tensor:
        """Per local index along `dim`: into how many pieces its segment is cut (tp // that = its copies)."""
        return torch.cat([torch.full((s.size // s.parts,), s.parts) for s in self.segments])


def _layout(dim: int, tp: int, *segments: tuple[int, int]) -> Layout:
    return Layout(dim, tuple(Segment(size, parts) for size, parts in segments if size > 0), tp)


# ---------------------------------------------------------------------------------------------------------------
# Collectives with the gradients each use needs
# ---------------------------------------------------------------------------------------------------------------
def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, op=op, group=group)
    return x


class _CopyToTP(torch.autograd.Function):
    """Identity forward; the gradient summed over the group (the input of column-parallel layers)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """Sum over the group forward (row-parallel outputs); the gradient, the same on every rank, passes as it is."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _SumOverTP(torch.autograd.Function):
    """Sum over the group forward and backward: a statistic each rank uses for different outputs (the gated
    norm's sum of squares), whose gradient on each rank is a part."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    """Concatenate the group's last dimensions forward; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank, ctx.n = group, dist.get_rank(group), x.shape[-1]
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g):
        return g.narrow(-1, ctx.rank * ctx.n, ctx.n), None


# ---------------------------------------------------------------------------------------------------------------
# The layers' tensor-parallel forms (the modules keep their parameters and names; only forward changes)
# ---------------------------------------------------------------------------------------------------------------
class ColumnParallelLinear(nn.Linear):
    """Output features split over the group: the input is the same on every rank, its gradient a sum."""

    tp_group = None

    def forward(self, x):
        return F.linear(_CopyToTP.apply(x, self.tp_group), self.weight, self.bias)


class RowParallelLinear(nn.Linear):
    """Input features split over the group: the partial products summed, then the (whole) bias added once."""

    tp_group = None

    def forward(self, x):
        y = _ReduceFromTP.apply(F.linear(x, self.weight), self.tp_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Rows [vocab_start, vocab_start + num_embeddings) of the vocabulary; other ids look up zeros; summed."""

    tp_group, vocab_start = None, 0

    def forward(self, ids):
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return _ReduceFromTP.apply(out.masked_fill(outside[..., None], 0.0), self.tp_group)


class VocabParallelLMHead(nn.Linear):
    """This rank's vocabulary rows; forward returns the whole logits. The loss reads `vocab_group` and never
    gathers them (Mamba2LMHeadModel.loss -> ops.linear_cross_entropy)."""

    vocab_group = None

    def forward(self, hidden):
        logits = F.linear(_CopyToTP.apply(hidden, self.vocab_group), self.weight, self.bias)
        return _GatherFromTP.apply(logits, self.vocab_group)


class GroupSplitGatedRMSNorm(GatedRMSNorm):
    """The gated norm when a group's channels lie on several ranks (tp % ngroups == 0, tp > ngroups): this rank's
    channels are one part of a group of `group_size`; the sum of squares is summed over the group's ranks."""

    tp_group = None

    def forward(self, x, z=None):
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        xc = x.to(cdt)
        if z is not None and not self.norm_before_gate:
            xc = xc * F.silu(z.to(cdt))
        sumsq = _SumOverTP.apply(xc.pow(2).sum(-1, keepdim=True), self.tp_group)
        out = xc * torch.rsqrt(sumsq / self.group_size + self.eps) * self.weight.to(cdt)
        if z is not None and self.norm_before_gate:
            out = out * F.silu(z.to(cdt))
        return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------
def check_tensor_parallel(config: Mamba2Config, tp: int) -> None:
    """LayoutError naming the field and the degree when `tp` cannot split this model."""
    if tp == 1:
        return
    ssm, g = config.ssm, config.ssm.ngroups
    pure = config.n_layer > len(config.attn_layer_idx)
    if pure:
        if g % tp and tp % g:
            raise LayoutError(f"parallel.tp = {tp} and ssm_cfg.ngroups = {g}: one must divide the other (B and C "
                              "groups split with the heads, or a group is shared by tp / ngroups ranks)")
        if config.nheads % tp:
            raise LayoutError(f"parallel.tp = {tp} does not divide the Mamba-2 heads (nheads = {config.nheads})")
        if (config.d_inner - config.d_ssm) % tp:
            raise LayoutError(f"parallel.tp = {tp} does not divide d_inner - d_ssm = {config.d_inner - config.d_ssm}")
    if config.attn_layer_idx:
        a = config.attn
        for name, n in (("num_heads", a.num_heads), ("num_heads_kv", a.num_heads_kv)):
            if n % tp:
                raise LayoutError(f"parallel.tp = {tp} does not divide the attention heads: attn_cfg.{name} = {n}")
        mlp = -(-a.mlp_dim // 256) * 256
        if mlp % (2 * tp):
            raise LayoutError(f"parallel.tp = {tp} does not divide the attention's MLP halves ({mlp // 2})")
    if config.d_intermediate > 0:
        hidden = -(-config.d_intermediate // 128) * 128
        if hidden % tp:
            raise LayoutError(f"parallel.tp = {tp} does not divide the MLP's hidden size ({hidden})")
    if config.padded_vocab_size % tp:
        raise LayoutError(f"parallel.tp = {tp} does not divide the padded vocabulary ({config.padded_vocab_size}); "
                          "set pad_vocab_size_multiple to a multiple of it")


@dataclass
class TensorParallel:
    """The split of one model over a tp group: the group, this rank's place in it, and each sharded parameter's
    layout (by its name in the model; parameters absent here are whole on every rank). `split_block` and
    `split_root` cut a part of the model (whole, as one process builds it) into this rank's pieces in place, so that
    a model built part by part never exists whole (parallelize.build_model)."""

    group: object
    tp: int
    rank: int
    layouts: dict[str, Layout] = field(default_factory=dict)
    shared_group: object = None  # the ranks sharing a B/C group (tp % ngroups == 0, tp > ngroups), else None

    @classmethod
    def for_model(cls, model: Mamba2LMHeadModel, tp_mesh) -> "TensorParallel":
        """The plan of `model` (whole or on the meta device) over the 1-D `tp_mesh`, as `model.tensor_parallel`."""
        cfg, tp = model.config, tp_mesh.size()
        check_tensor_parallel(cfg, tp)
        plan = cls(tp_mesh.get_group(), tp, tp_mesh.get_local_rank())
        g = cfg.ssm.ngroups
        if tp % g == 0 and tp > g and cfg.n_layer > len(cfg.attn_layer_idx):
            # the ranks of a group: neighbouring blocks of tp // g ranks of the tp group
            shared = tp_mesh._unflatten(0, (g, tp // g), ("tp_groups", "tp_group_ranks"))
            plan.shared_group = shared["tp_group_ranks"].get_group()
        model.tensor_parallel = plan
        return plan

    def split_block(self, block: nn.Module, i: int) -> None:
        fqn, m, tp = f"backbone.layers.{i}.mixer", block.mixer, self.tp
        if isinstance(m, Mamba2Mixer):
            self._split_mamba(m, fqn)
        elif isinstance(m, Attention):
            self._split_attention(m, fqn)
        else:
            raise TypeError(f"tensor parallel: unknown mixer {type(m).__name__}")
        if isinstance(block.mlp, GatedMLP):
            h = block.mlp.fc2.in_features
            self._column(block.mlp.fc1, _layout(0, tp, (h, tp), (h, tp)), f"backbone.layers.{i}.mlp.fc1")
            self._row(block.mlp.fc2, _layout(1, tp, (h, tp)), f"backbone.layers.{i}.mlp.fc2")

    def split_root(self, model: Mamba2LMHeadModel) -> None:
        """The embedding and the LM head, by vocabulary rows."""
        tp, V = self.tp, model.config.padded_vocab_size
        emb, head = model.backbone.embedding, model.lm_head
        tied = head.weight is emb.weight
        vocab = _layout(0, tp, (V, tp))
        self._shard(emb, "weight", vocab, "backbone.embedding")
        emb.__class__, emb.tp_group = VocabParallelEmbedding, self.group
        emb.vocab_start, emb.num_embeddings = self.rank * V // tp, V // tp
        if tied:
            head.weight = emb.weight
            self.layouts["lm_head.weight"] = vocab
        else:
            self._shard(head, "weight", vocab, "lm_head")
        head.__class__, head.vocab_group, head.out_features = VocabParallelLMHead, self.group, V // tp

    def _shard(self, module: nn.Module, name: str, layout: Layout, fqn: str):
        p = getattr(module, name)
        if p is None:
            return
        setattr(module, name, nn.Parameter(layout.shard(p.detach(), self.rank).clone(), requires_grad=p.requires_grad))
        self.layouts[f"{fqn}.{name}"] = layout

    def _column(self, lin: nn.Linear, layout: Layout, fqn: str):
        self._shard(lin, "weight", layout, fqn)
        self._shard(lin, "bias", Layout(0, layout.segments, self.tp), fqn)
        lin.__class__, lin.tp_group, lin.out_features = ColumnParallelLinear, self.group, layout.local_size

    def _row(self, lin: nn.Linear, layout: Layout, fqn: str):
        self._shard(lin, "weight", layout, fqn)  # (the bias stays whole: it is added once, after the sum)
        lin.__class__, lin.tp_group, lin.in_features = RowParallelLinear, self.group, layout.local_size

    def _split_mamba(self, m: Mamba2Mixer, fqn: str):
        tp, g, n = self.tp, m.ngroups, m.d_state
        bc = tp if g % tp == 0 else g  # B and C: split with the heads, or one group per set of tp // g ranks
        self._column(m.in_proj, _layout(0, tp, (m.d_mlp, tp), (m.d_mlp, tp), (m.d_ssm, tp), (m.d_ssm, tp),
                                        (g * n, bc), (g * n, bc), (m.nheads, tp)), f"{fqn}.in_proj")
        conv = _layout(0, tp, (m.d_ssm, tp), (g * n, bc), (g * n, bc))
        self._shard(m.conv1d, "weight", conv, f"{fqn}.conv1d")
        self._shard(m.conv1d, "bias", conv, f"{fqn}.conv1d")
        for name in ("dt_bias", "A_log", "D"):
            self._shard(m, name, _layout(0, tp, (getattr(m, name).shape[0], tp)), fqn)
        self._row(m.out_proj, _layout(1, tp, (m.d_mlp, tp), (m.d_ssm, tp)), f"{fqn}.out_proj")
        if m.norm is not None:
            self._shard(m.norm, "weight", _layout(0, tp, (m.d_ssm, tp)), f"{fqn}.norm")
            if bc != tp:  # a group's channels on several ranks
                m.norm.__class__, m.norm.tp_group = GroupSplitGatedRMSNorm, self.shared_group
        m.d_ssm, m.d_mlp, m.nheads = m.d_ssm // tp, m.d_mlp // tp, m.nheads // tp
        m.ngroups = g // tp if g % tp == 0 else 1
        m.conv_dim = m.d_ssm + 2 * m.ngroups * n
        m.conv1d.in_channels = m.conv1d.out_channels = m.conv1d.groups = m.conv_dim

    def _split_attention(self, a: Attention, fqn: str):
        tp, hd, half = self.tp, a.head_dim, a.mlp_dim // 2
        q, kv = a.num_heads * hd, a.num_heads_kv * hd
        self._column(a.in_proj, _layout(0, tp, (q, tp), (kv, tp), (kv, tp), (half, tp), (half, tp)),
                     f"{fqn}.in_proj")
        if a.d_conv > 0:
            conv = _layout(0, tp, (q, tp), (kv, tp), (kv, tp))
            self._shard(a.conv1d, "weight", conv, f"{fqn}.conv1d")
            self._shard(a.conv1d, "bias", conv, f"{fqn}.conv1d")
        self._row(a.out_proj, _layout(1, tp, (q, tp), (half, tp)), f"{fqn}.out_proj")
        a.num_heads, a.num_heads_kv, a.mlp_dim = a.num_heads // tp, a.num_heads_kv // tp, a.mlp_dim // tp
        a.qkv_dim = hd * (a.num_heads + 2 * a.num_heads_kv)
        if a.d_conv > 0:
            a.conv1d.in_channels = a.conv1d.out_channels = a.conv1d.groups = a.qkv_dim


def apply_tensor_parallel(model: Mamba2LMHeadModel, tp_mesh) -> Mamba2LMHeadModel:
    """Split `model` (whole, the same on every rank of the group, not yet FSDP-sharded) over the 1-D `tp_mesh` in
    place; returns it, with `model.tensor_parallel` the plan."""
    plan = TensorParallel.for_model(model, tp_mesh)
    for i, block in enumerate(model.backbone.layers):
        plan.split_block(block, i)
    plan.split_root(model)
    return model


# ---------------------------------------------------------------------------------------------------------------
# The loss over vocabulary shards
# ---------------------------------------------------------------------------------------------------------------
CHUNK_ELEMENTS = 1 << 26  # logits per chunk of rows (256 MiB in float32)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy of hidden @ weight.T where weight holds rows [rank·V_local, (rank + 1)·V_local) of the
    vocabulary: per row, this shard's max, sum of exps and label logit, then one max and one sum all-reduce. The
    logits exist a chunk of rows at a time (the backward recomputes them); d hidden is summed over the group."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, mean, group):
        cdt = torch.float64 if weight.dtype == torch.float64 else torch.float32
        N, V = hidden.shape[0], weight.shape[0]
        local = labels - dist.get_rank(group) * V
        valid = labels != ignore_index
        mine = valid & (local >= 0) & (local < V)
        local = local.masked_fill(~mine, 0)
        m = torch.empty(N, dtype=cdt, device=hidden.device)
        s, target = torch.empty_like(m), torch.empty_like(m)
        rows = max(1, CHUNK_ELEMENTS // V)
        for a in range(0, N, rows):
            logits = (hidden[a:a + rows] @ weight.t()).to(cdt)
            m[a:a + rows] = logits.max(-1).values
            s[a:a + rows] = (logits - m[a:a + rows, None]).exp().sum(-1)
            target[a:a + rows] = logits.gather(1, local[a:a + rows, None])[:, 0] * mine[a:a + rows]
        top = _all_reduce(m, group, dist.ReduceOp.MAX)
        s, target = _all_reduce(torch.stack([s * (m - top).exp(), target]), group)
        lse = top + s.log()
        n_valid = valid.sum()
        loss = (lse - target).masked_fill(~valid, 0.0).sum()
        if mean:
            loss = loss / n_valid
        ctx.save_for_backward(hidden, weight, local, mine, valid, lse, n_valid)
        ctx.mean, ctx.group, ctx.rows = mean, group, rows
        return loss

    @staticmethod
    def backward(ctx, dloss):
        hidden, weight, local, mine, valid, lse, n_valid = ctx.saved_tensors
        cdt = lse.dtype
        scale = (dloss / n_valid if ctx.mean else dloss).to(cdt)
        dh = torch.empty_like(hidden)
        dw = torch.zeros(weight.shape, dtype=cdt, device=weight.device)
        for a in range(0, hidden.shape[0], ctx.rows):
            h = hidden[a:a + ctx.rows]
            grad = ((h @ weight.t()).to(cdt) - lse[a:a + ctx.rows, None]).exp()
            grad.scatter_add_(1, local[a:a + ctx.rows, None], -mine[a:a + ctx.rows, None].to(cdt))
            grad *= valid[a:a + ctx.rows, None] * scale
            dh[a:a + ctx.rows] = grad.to(h.dtype) @ weight
            dw += grad.t() @ h.to(cdt)
        return _all_reduce(dh, ctx.group), dw.to(weight.dtype), None, None, None, None


def vocab_parallel_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean", group=None):
    """ops.linear_cross_entropy with the vocabulary split over `group` (weight: this rank's rows, in rank order;
    labels: whole-vocabulary ids). The same loss on every rank."""
    return _VocabParallelCrossEntropy.apply(hidden, weight, labels, ignore_index, reduction == "mean", group)


# ---------------------------------------------------------------------------------------------------------------
# Gradients: shared pieces summed, one global norm
# ---------------------------------------------------------------------------------------------------------------
def _local(t: torch.Tensor):
    """A tensor's local part, its offset along dim 0 in the tensor it is part of, and how many distinct parts the
    ranks of its mesh hold (FSDP2's shards; 1 for a plain tensor)."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(t, DTensor):
        return t, 0, 1
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    parts = 1
    for size, placement in zip(t.device_mesh.shape, t.placements):
        parts *= size if isinstance(placement, Shard) else 1
    return t._local_tensor, offset[0], parts


def _along(layout: Layout, values: torch.Tensor, local: torch.Tensor, offset: int) -> torch.Tensor:
    """Per-index `values` along the layout's dim, cut to a local part starting at `offset` (dim 0), shaped to
    broadcast over it."""
    if layout.dim == 0:
        values = values[offset:offset + local.shape[0]]
    shape = [1] * local.dim()
    shape[layout.dim] = -1
    return values.to(local.device).view(shape)


@torch.no_grad()
def sync_replicated_grads(model: nn.Module) -> None:
    """Sum the gradients of the pieces that several ranks of the tp group hold (B and C rows of in_proj and
    channels of conv1d when tp % ngroups == 0) over those ranks: each rank's backward saw only its own heads. Call
    after the backward (and FSDP's reduction), before clipping and the optimizer step."""
    plan: Optional[TensorParallel] = getattr(model, "tensor_parallel", None)
    if plan is None or plan.shared_group is None:
        return
    views = []
    for name, p in model.named_parameters():
        layout = plan.layouts.get(name)
        if layout is None or p.grad is None:
            continue
        g, offset, _ = _local(p.grad)
        for _, a, n, parts in layout.pieces(plan.rank):
            if parts == plan.tp:
                continue
            if layout.dim == 0:
                a, n = max(a, offset) - offset, min(a + n, offset + g.shape[0]) - max(a, offset)
            if n > 0:
                views.append(g.narrow(layout.dim, a, n))
    if views:
        flat = _all_reduce(torch.cat([v.reshape(-1) for v in views]), plan.shared_group)
        for v, part in zip(views, flat.split([v.numel() for v in views])):
            v.copy_(part.view_as(v))


@torch.no_grad()
def grad_norm(model: nn.Module) -> torch.Tensor:
    """The 2-norm of all the model's gradients as one vector of the whole model's elements, each counted once
    whatever the ranks that hold it (FSDP2 shards, tensor-parallel pieces, replicated parameters), on every rank.
    Gradients may be DTensors or plain tensors."""
    plan: Optional[TensorParallel] = getattr(model, "tensor_parallel", None)
    world = dist.get_world_size() if dist.is_initialized() else 1
    total = None
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g, offset, shards = _local(p.grad)
        sq = g.to(torch.float64 if g.dtype == torch.float64 else torch.float32).pow(2)
        layout = plan.layouts.get(name) if plan is not None else None
        if layout is not None:  # a piece cut into `parts` is held by world / (shards · parts) ranks
            sq = sq * _along(layout, layout.parts_along(), g, offset)
        part = sq.sum() * (shards / world)
        total = part if total is None else total + part.to(total.dtype)
    if total is None:
        return torch.zeros(())
    if world > 1:
        dist.all_reduce(total)
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole model's gradients, however they are split (`grad_norm`)."""
    norm = grad_norm(model)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            g = _local(p.grad)[0]
            g.mul_(coef.to(g.device, g.dtype))
    return norm


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: mamba_ssm's whole tensors, sharded over the data-parallel mesh as the local ones were
# ---------------------------------------------------------------------------------------------------------------
def _like(value: torch.Tensor, shape, whole: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A tensor of `shape` (the contents of `whole`, or empty) distributed as `value` is: a DTensor on its mesh
    with its placements, or a plain tensor."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(value, DTensor):
        return whole if whole is not None else torch.empty(shape, dtype=value.dtype, device=value.device)
    local_shape, offset = compute_local_shape_and_global_offset(torch.Size(shape), value.device_mesh,
                                                                value.placements)
    if whole is None:
        local = torch.empty(local_shape, dtype=value.dtype, device=value._local_tensor.device)
    else:
        local = whole[tuple(slice(o, o + n) for o, n in zip(offset, local_shape))].clone()
    return DTensor.from_local(local, value.device_mesh, value.placements, run_check=False, shape=torch.Size(shape),
                              stride=_contiguous_stride(shape))


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, out = 1, []
    for n in reversed(shape):
        out.append(stride)
        stride *= n
    return tuple(reversed(out))


def _whole_shape(value: torch.Tensor, layout: Layout) -> list[int]:
    shape = list(value.shape)
    shape[layout.dim] = sum(s.size for s in layout.segments)
    return shape


def to_whole(plan: TensorParallel, name: str, value: torch.Tensor) -> torch.Tensor:
    """A parameter's (or its optimizer state's) local value -> the whole tensor, distributed over the data-parallel
    mesh as `value` is. Collective over the world: call for the same names in the same order on every rank."""
    layout = plan.layouts.get(name)
    if layout is None or not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    local = value.full_tensor() if hasattr(value, "full_tensor") else value
    gathered = [torch.empty_like(local, memory_format=torch.contiguous_format) for _ in range(plan.tp)]
    dist.all_gather(gathered, local.contiguous(), group=plan.group)
    whole = layout.unshard(gathered)
    return _like(value, whole.shape, whole)


def whole_placeholder(plan: TensorParallel, name: str, value: torch.Tensor) -> torch.Tensor:
    """An empty tensor shaped and distributed as `to_whole(plan, name, value)` would be, for a checkpoint to fill."""
    layout = plan.layouts.get(name)
    if layout is None or not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    return _like(value, _whole_shape(value, layout))


def from_whole(plan: TensorParallel, name: str, whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of to_whole: this rank's piece of `whole`, distributed as `like` (the local value) is."""
    layout = plan.layouts.get(name)
    if layout is None or not isinstance(whole, torch.Tensor) or whole.dim() == 0:
        return whole
    full = whole.full_tensor() if hasattr(whole, "full_tensor") else whole
    piece = layout.shard(full, plan.rank)
    return _like(like, piece.shape, piece)
