"""Causal attention over packed documents on the GPU: SDPA's flash kernel where the mask is plain causal, flex
attention with a block mask built from the document ids everywhere else. Reached through `lit_mamba2.ops.attention`,
which checks the arguments and normalizes them (both or neither of doc_q / doc_k, an int q_offset).

Positions: key j sits at position j, query i at position q_offset + i; query i sees key j iff j <= q_offset + i and
doc_q[b, i] == doc_k[b, j].

Why flex attention: a dense (batch, 1, Lq, Lk) boolean mask drops SDPA off its flash kernel onto the memory-efficient
one (or the math one), which also reads the whole mask and computes every masked tile. Flex attention skips the
tiles the block mask marks empty, runs the tiles marked full without evaluating the mask, and takes GQA, any scale,
fp32/fp16/bf16 and queries offset into the keys (a KV cache, or later a context-parallel shard) through the one
mask_mod. It is a public API since torch 2.5 and runs on CPU too (eager, or compiled by inductor), so the same code
is tested here. torch's `varlen_attn` (cu_seqlens, flash) would skip the empty tiles too but needs the documents as
contiguous runs, its boundaries on the host (a sync per call), CUDA with fp16/bf16, and its signature changed between
releases; see benchmarks/bench_attention.py for both timed side by side.

The block mask is computed here from per-block document ranges, O(batch * Lq/128 * Lk/128) work, instead of
`create_block_mask`, which evaluates the mask at every (query, key) pair: a block is empty if causality or the
documents' ranges rule every pair out, full if the causal mask is all true inside it and the whole block lies in one
document on both sides (and neither side is a ragged last block), partial otherwise. Document ids need not be sorted:
disjoint id ranges are a sufficient test for emptiness in any order (sorted ids make it tight).

flex_attention is only fast compiled (its docs: without torch.compile it materializes the full scores); one compiled
function is kept at module level. On CUDA the compiled one runs; elsewhere the eager one, unless compile=True.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention as _flex_attention

BLOCK_SIZE = 128  # flex attention's default sparse block (its kernels' tiles divide it)

_compiled_flex = None


def compiled_flex_attention():
    """torch.compile(flex_attention), made once per process. dynamic=None: the first shape compiles static, a later
    new shape once more with dynamic sizes (a KV cache that grows), after that no recompiles."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(_flex_attention)
    return _compiled_flex


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad_blocks(doc: torch.Tensor, nblocks: int, block: int) -> torch.Tensor:
    """(b, L) -> (b, nblocks * block), the padding a copy of the last id (so that block min/max see real ids only)."""
    pad = nblocks * block - doc.shape[1]
    return torch.cat([doc, doc[:, -1:].expand(-1, pad)], dim=1) if pad else doc


def _ordered(blocks: torch.Tensor):
    """(b, nq, nk) bool -> (num (b, 1, nq), indices (b, 1, nq, nk)) int32: each row's set blocks first, in order."""
    num = blocks.sum(-1, dtype=torch.int32)
    idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num[:, None].contiguous(), idx[:, None].contiguous()


def block_mask(doc_q, doc_k, q_offset: int, batch: int, q_len: int, kv_len: int, device,
               block_size: int = BLOCK_SIZE) -> BlockMask:
    """The flex BlockMask of causal attention (query i at position q_offset + i) within documents (doc_q (b, Lq),
    doc_k (b, Lk) int32, or both None). Head dimension 1: broadcast over heads."""
    nq, nk = _cdiv(q_len, block_size), _cdiv(kv_len, block_size)
    qb = torch.arange(nq, device=device)
    kb = torch.arange(nk, device=device)
    q_first = q_offset + qb * block_size
    q_last = q_offset + torch.clamp((qb + 1) * block_size, max=q_len) - 1
    k_first = kb * block_size
    k_last = torch.clamp((kb + 1) * block_size, max=kv_len) - 1
    some = (k_first[None, :] <= q_last[:, None])[None]  # (1, nq, nk): some pair is causally visible
    full = (k_last[None, :] <= q_first[:, None])[None]  # every pair is
    whole = (((qb + 1) * block_size <= q_len)[:, None] & ((kb + 1) * block_size <= kv_len)[None, :])[None]
    full = full & whole  # ragged last blocks stay partial: the mask is evaluated there
    offset = torch.full((), q_offset, dtype=torch.int32, device=device)  # a tensor: no recompile per offset
    if doc_q is None:
        some, full = some.expand(batch, nq, nk), full.expand(batch, nq, nk)

        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx + offset >= kv_idx
    else:
        dq = _pad_blocks(doc_q, nq, block_size)
        dk = _pad_blocks(doc_k, nk, block_size)
        qv, kv = dq.view(batch, nq, block_size), dk.view(batch, nk, block_size)
        qmin, qmax = qv.amin(-1), qv.amax(-1)
        kmin, kmax = kv.amin(-1), kv.amax(-1)
        meet = (qmin[:, :, None] <= kmax[:, None, :]) & (kmin[:, None, :] <= qmax[:, :, None])
        one_doc = (qmin == qmax)[:, :, None] & (kmin == kmax)[:, None, :] & (qmin[:, :, None] == kmin[:, None, :])
        some, full = some & meet, full & one_doc

        def mask_mod(b, h, q_idx, kv_idx):  # the padded ids: safe for a kernel that reads past the last block
            return (q_idx + offset >= kv_idx) & (dq[b, q_idx] == dk[b, kv_idx])
    kv_num, kv_idx = _ordered(some & ~full)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(q_len, kv_len))


def flex(q, k, v, doc_q=None, doc_k=None, q_offset=None, scale=None, compile=None, block_size=BLOCK_SIZE):
    """Flex attention with `block_mask`'s mask. compile: None = compiled on CUDA, eager elsewhere."""
    b, h, q_len, _ = q.shape
    kv_len = k.shape[2]
    q_offset = kv_len - q_len if q_offset is None else q_offset
    mask = block_mask(doc_q, doc_k, q_offset, b, q_len, kv_len, q.device, block_size)
    gqa = h != k.shape[1]
    if compile if compile is not None else q.is_cuda:
        return compiled_flex_attention()(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)
    with warnings.catch_warnings():  # eager on purpose (tests, CPU): not the "use torch.compile" advice
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        return _flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)


def attention(q, k, v, doc_q=None, doc_k=None, q_offset=None, scale=None, always_flex=False, compile=None):
    """The fast path: SDPA (flash on CUDA) where no documents are given and every query sees a plain causal (or,
    for one query at the end, a full) row of keys; flex attention otherwise, or always when always_flex."""
    q_len, kv_len = q.shape[2], k.shape[2]
    q_offset = kv_len - q_len if q_offset is None else q_offset
    if doc_q is None and not always_flex:
        gqa = q.shape[1] != k.shape[1]
        if q_len == kv_len:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        if q_len == 1 and q_offset == kv_len - 1:  # one decoding step: it sees every key
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    return flex(q, k, v, doc_q, doc_k, q_offset, scale, compile)
