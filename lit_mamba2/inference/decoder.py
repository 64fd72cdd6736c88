"""The decoder: static buffers for one batch size and maximum length, the decode step chosen for the device, a
CUDA graph of it, and programmatic dependent launch."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from lit_mamba2 import ops
from lit_mamba2.inference.pipeline import RowPipeline, unsupported_reason
from lit_mamba2.inference.step import DecodePositions, KVSlots, MixerCache, decode_step
from lit_mamba2.inference.weights import MixerWeights, ModelWeights
from lit_mamba2.model import KVCache, Mamba2LMHeadModel, Mamba2State

# Batch sizes below which the Triton step uses the fused conv + state kernel (ring_conv) and the linear layers
# with fused norms (fuse_linear) by default; measured on an H100 (BENCHMARKS.md, "Decoding").
RING_CONV_BELOW = 16
FUSE_LINEAR_BELOW = 8
# Batch sizes (inclusive) at which pure Mamba-2 models step as a pipeline of PIPELINE_GROUPS row groups by default
# (pipeline.py): measured on an H100 at batch 64 (BENCHMARKS.md), with up to 32 rows per group, the tile it was
# tuned with.
PIPELINE_BATCHES = (64, 96)
PIPELINE_GROUPS = 3


class Decoder:
    """Decoding buffers for one batch size and maximum length: per-layer states (fixed-size KV caches for
    attention), the input token and the positions; `step` is one token for every row, replayed from a CUDA graph
    when `cuda_graph` (default: on CUDA). `compile=True` also runs the step through torch.compile.

    `impl` (default: what model.set_impl forced, else by device) picks the ops' implementation for the step. On
    the Triton path the specialisations below default to where they measured faster on an H100 (BENCHMARKS.md);
    on the PyTorch path they default off (each has a PyTorch form, so that tests can check it on CPU):
    - `ring_conv` (below batch RING_CONV_BELOW): conv states as rings, one kernel for conv and state update.
    - `fuse_linear` (below batch FUSE_LINEAR_BELOW): linear layers as GEMVs with the norms before them fused in
      (three launches per Mamba-2 layer; 0.41-0.47x the time of cuBLAS + separate norms at batch 1).
    - `fold_gated_norm` (wherever fuse_linear is off; True turns fuse_linear's default off): each gated RMSNorm
      rides in the state kernel and the next add+norm (1.4-2.8% less time per step at batch 64, 7-13% at 8-16).
    - `row_groups` (PIPELINE_GROUPS at batch sizes in PIPELINE_BATCHES for pure Mamba-2 models whose norms fold;
      0 = off): the batch steps as row groups in a pipeline, three launches per layer (pipeline.py).
    `state_dtype`: the SSM states' storage, by default the model's dtype as in mamba_ssm (bf16 states: 32-35% less
    time per step at batch 64); torch.float32 keeps long outputs closer to exact (BENCHMARKS.md measures the drift).
    `pdl` (default on): the Triton kernels launch with programmatic dependent launch (kernels/pdl.py; 18-22% less
    time per step at batch 1 on an H100); a no-op under TRITON_INTERPRET, before sm90 and on Tritons without it."""

    def __init__(self, model: Mamba2LMHeadModel, batch_size: int, max_len: int, cuda_graph: Optional[bool] = None,
                 compile: bool = False, state_dtype: Optional[torch.dtype] = None,
                 ring_conv: Optional[bool] = None, fuse_linear: Optional[bool] = None, pdl: bool = True,
                 fold_gated_norm: Optional[bool] = None, row_groups: Optional[int] = None,
                 impl: Optional[str] = None):
        if impl not in ops.IMPLS:
            raise ValueError(f"Decoder: impl must be one of {ops.IMPLS}, got {impl!r}")
        self.model = model
        self.weights = weights = ModelWeights.of(model)
        self.impl = impl if impl is not None else model.impl
        weight = weights.lm_head
        device = weight.device
        self.batch_size, self.max_len = batch_size, max_len
        triton = ops.on_triton(self.impl, weight)
        conflict = ring_conv is False or fuse_linear or fold_gated_norm is False or compile  # with the pipeline
        if row_groups is None:  # the default where it measured faster, if nothing asked otherwise
            row_groups = (PIPELINE_GROUPS if PIPELINE_BATCHES[0] <= batch_size <= PIPELINE_BATCHES[1]
                          and device.type == "cuda" and triton and not conflict
                          and unsupported_reason(weights) is None else 0)
        if row_groups:  # the pipeline's in_proj stage keeps the conv states as rings
            if conflict:
                raise ValueError("Decoder: row_groups needs the ring conv, the unfused linears, the folded gated "
                                 "norm and no compile")
            if not 1 <= row_groups <= 3:
                raise ValueError(f"Decoder: row_groups must be 0-3, got {row_groups}")
            reason = unsupported_reason(weights)
            if reason is not None:
                raise ValueError(f"Decoder: row_groups: {reason}")
            ring_conv, fuse_linear, fold_gated_norm = True, False, True
        if ring_conv is None:
            ring_conv = triton and batch_size < RING_CONV_BELOW
        if fuse_linear is None:  # an explicit fold_gated_norm=True asks for the unfused linears
            fuse_linear = triton and batch_size < FUSE_LINEAR_BELOW and not fold_gated_norm
        if fold_gated_norm is None:  # the fused GEMVs carry the gated norm in out_proj's prologue already
            fold_gated_norm = triton and not fuse_linear
        if fold_gated_norm and fuse_linear:
            raise ValueError("Decoder: fold_gated_norm=True needs fuse_linear=False (the fused GEMVs carry the "
                             "gated norm in out_proj's prologue already)")
        self.ring_conv, self.fuse_linear, self.fold_gated_norm = ring_conv, fuse_linear, fold_gated_norm
        self.pdl = pdl and ops.triton_available()  # (triton is an optional dependency)
        self.state_dtype = state_dtype or weight.dtype
        self.states = []
        for lw in weights.layers:
            m = lw.mixer
            if isinstance(m, MixerWeights):
                width = m.conv.shape[1]
                if ring_conv:  # slot-major storage, (batch, width, conv_dim) seen as (batch, conv_dim, width): a
                    # slot's channels are contiguous, so the kernel's loads of one slot coalesce
                    conv = torch.zeros(batch_size, width, m.conv_dim, device=device, dtype=weight.dtype)
                    conv = conv.transpose(1, 2)
                else:
                    conv = torch.zeros(batch_size, m.conv_dim, width - 1, device=device, dtype=weight.dtype)
                ssm = torch.zeros(batch_size, m.nheads, m.headdim, m.d_state, device=device, dtype=self.state_dtype)
                self.states.append(MixerCache(conv, ssm, ring_conv))
            else:
                k = torch.zeros(batch_size, m.num_heads_kv, max_len, m.head_dim, device=device, dtype=weight.dtype)
                conv = (None if m.conv is None else
                        torch.zeros(batch_size, m.qkv_dim, m.conv.shape[1] - 1, device=device, dtype=weight.dtype))
                self.states.append(KVSlots(k, torch.zeros_like(k), conv))
        self.has_attention = any(isinstance(st, KVSlots) for st in self.states)
        zeros = dict(device=device, dtype=torch.long)
        # cache_pos and positions are views of one buffer, so that one launch advances both
        self._advancing = torch.zeros(1 + batch_size, **zeros)
        self.pos = DecodePositions(self._advancing[0], self._advancing[1:], torch.zeros(batch_size, **zeros))
        self.token = torch.zeros(batch_size, **zeros)
        self.cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        # the pipeline runs Triton kernels only; on the PyTorch path its flags (ring conv, folded norm) step as usual
        self.row_pipeline = (RowPipeline(weights, self.states, self.pos.cache_pos, row_groups)
                             if row_groups and triton else None)
        self._fn = torch.compile(self._eager_step, dynamic=False) if compile else self._eager_step
        self.graph, self.logits = None, None
        self.filled = 0

    def _eager_step(self):
        context = contextlib.nullcontext()
        if self.pdl:  # (kernels.pdl imports triton, an optional dependency)
            from lit_mamba2.kernels.pdl import launching

            context = launching()
        with context:
            if self.row_pipeline is not None:
                logits = self.row_pipeline.step(self.token)
            else:
                logits = decode_step(self.weights, self.token, self.states, self.pos, self.fuse_linear,
                                     self.fold_gated_norm, self.impl)
        self._advancing.add_(1)  # cache_pos and positions move on by one token
        return logits

    def capture(self):
        """Warm up (compiles the kernels) on a side stream, then capture one step. The states it scribbles on are
        overwritten by the next prefill."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._fn()
        torch.cuda.synchronize()

    def prefill(self, ids: torch.Tensor, seq_idx=None, lengths=None, pads=None) -> torch.Tensor:
        """Run the prompts (left-padded, (batch, L)) through the model's chunked path; returns the last position's
        logits."""
        b, L = ids.shape
        if b != self.batch_size or L >= self.max_len:
            raise ValueError(f"prefill: ids {tuple(ids.shape)} do not fit the decoder (batch {self.batch_size}, "
                             f"max_len {self.max_len})")
        if self.cuda_graph and self.graph is None:
            self.capture()
        fresh = self.model.allocate_states(b, device=ids.device)
        logits = self.model(ids, seq_idx=seq_idx, states=fresh)[:, -1]
        for st, new in zip(self.states, fresh):
            if isinstance(new, Mamba2State):
                if st.ring:  # oldest input (position L - width + 1) first: slots (L + 1 + k) % width
                    w = st.conv.shape[-1]
                    st.conv.index_copy_(-1, (L + 1 + torch.arange(w - 1, device=ids.device)) % w, new.conv)
                else:
                    st.conv.copy_(new.conv)
                st.ssm.copy_(new.ssm)
            else:
                assert isinstance(new, KVCache)
                st.k[:, :, :L].copy_(new.k)
                st.v[:, :, :L].copy_(new.v)
                if st.conv is not None:
                    st.conv.copy_(new.conv)
        self.filled = L  # host-side count of KV slots used, so that step() needs no device sync to check it
        self.pos.cache_pos.fill_(L)
        self.pos.positions.copy_(lengths if lengths is not None else torch.full((b,), L))
        self.pos.kv_start.copy_(pads if pads is not None else torch.zeros(b))
        return logits

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token (batch,) -> logits (batch, padded_vocab) for the next position."""
        if self.filled >= self.max_len and self.has_attention:
            raise ValueError(f"decoder is full: max_len {self.max_len} reached")
        self.filled += 1
        self.token.copy_(token)
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._fn()
