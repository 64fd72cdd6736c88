"""`lit_mamba2.attention` (causal attention within packed documents): the reference and the flex attention path
against a naive softmax loop written out here, the flex block mask against the dense mask, and the argument checks.

Flex attention runs on CPU eagerly (the mask is then evaluated at every pair, so the block mask is checked apart,
against the dense mask) and compiled by inductor (which skips the empty blocks and evaluates no mask in the full
ones: one test, tiny shapes). Flex attention has no backward on CPU, eager or compiled: its gradients are checked on
the GPU (benchmarks/check_attention_gpu.py)."""

import math

import pytest
import torch

from lit_mamba2 import attention, reference as R
from lit_mamba2.kernels import attention as KA

F64, F32, I32 = torch.float64, torch.float32, torch.int32


def naive(q, k, v, doc_q=None, doc_k=None, q_offset=None, scale=None):
    """Softmax attention one query at a time, in float64, over the keys listed by the rule itself."""
    b, h, Lq, d = q.shape
    hk, Lk = k.shape[1], k.shape[2]
    off = Lk - Lq if q_offset is None else q_offset
    if doc_k is not None and doc_q is None:
        doc_q = doc_k[:, off:off + Lq]
    scale = 1 / math.sqrt(d) if scale is None else scale
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    out = torch.zeros(b, h, Lq, d, dtype=F64)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hk)  # GQA: consecutive query heads share a key head
            for i in range(Lq):
                keys = [j for j in range(Lk) if j <= off + i and (doc_q is None or doc_q[bi, i] == doc_k[bi, j])]
                s = torch.stack([q[bi, hi, i] @ k[bi, kh, j] for j in keys]) * scale
                p = torch.exp(s - s.max())
                out[bi, hi, i] = sum(pj * v[bi, kh, j] for pj, j in zip(p / p.sum(), keys))
    return out


def docs(*rows):
    """Rows of (doc id, length) runs -> int32 (batch, L)."""
    return torch.tensor([[i for i, n in row for _ in range(n)] for row in rows], dtype=I32)


# name: (heads, heads_kv, Lq, Lk, doc_k (b, Lk) or None, q_offset, scale)
CASES = {
    "causal": (2, 2, 24, 24, None, None, None),
    "packed": (2, 2, 24, 24, docs([(0, 7), (1, 1), (2, 16)], [(3, 24)]), None, None),
    "cache_no_docs": (2, 2, 9, 24, None, None, None),
    "cache_docs": (2, 2, 9, 24, docs([(0, 10), (1, 8), (2, 6)], [(4, 2), (5, 22)]), None, None),
    "gqa": (6, 2, 24, 24, docs([(0, 5), (1, 19)], [(0, 13), (1, 11)]), None, None),
    "scale": (2, 1, 24, 24, docs([(0, 11), (7, 13)], [(1, 24)]), None, 0.37),
    "shard": (4, 2, 8, 24, docs([(0, 10), (1, 14)], [(2, 3), (3, 21)]), 9, 0.5),  # queries 9..16 of 24 keys
    "decode": (4, 2, 1, 24, None, None, None),
    "unsorted_ids": (2, 2, 24, 24, docs([(5, 6), (2, 10), (9, 8)], [(1, 4), (0, 20)]), None, None),
}


def make(case, dtype, seed=0):
    h, hk, Lq, Lk, doc_k, off, scale = CASES[case]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, h, Lq, 8, generator=g, dtype=F64).to(dtype)
    k = torch.randn(2, hk, Lk, 8, generator=g, dtype=F64).to(dtype)
    v = torch.randn(2, hk, Lk, 8, generator=g, dtype=F64).to(dtype)
    return q, k, v, dict(doc_k=doc_k, q_offset=off, scale=scale)


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_naive_loop(case):
    q, k, v, kw = make(case, F64)
    expect = naive(q, k, v, **kw)
    torch.testing.assert_close(R.attention(q, k, v, **kw), expect, rtol=0, atol=1e-12)
    torch.testing.assert_close(attention(q, k, v, **kw), expect, rtol=0, atol=1e-12)  # impl=None on CPU: the ref


@pytest.mark.parametrize("case", list(CASES))
def test_flex_eager_matches_naive_loop(case):
    q, k, v, kw = make(case, F32)
    expect = naive(q, k, v, **kw).to(F32)
    torch.testing.assert_close(attention(q, k, v, **kw, impl="flex"), expect, rtol=1e-5, atol=1e-5)
    # the dispatcher of the GPU path: SDPA where the mask is plain causal (or a decoding step), flex otherwise
    doc_k, off = kw["doc_k"], k.shape[2] - q.shape[2] if kw["q_offset"] is None else kw["q_offset"]
    doc_q = None if doc_k is None else doc_k[:, off:off + q.shape[2]]
    out = KA.attention(q, k, v, doc_q, doc_k, off, kw["scale"])
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def blocks_of(bm):
    """(partial, full) bool tables (b, nq, nk) of a BlockMask with head dimension 1."""
    def table(num, idx):
        b, _, nq, nk = idx.shape
        t = torch.zeros(b, nq, nk, dtype=torch.bool)
        for bi in range(b):
            for i in range(nq):
                t[bi, i, idx[bi, 0, i, :num[bi, 0, i]].long()] = True
        return t
    return table(bm.kv_num_blocks, bm.kv_indices), table(bm.full_kv_num_blocks, bm.full_kv_indices)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bs", [4, 8])
def test_block_mask_covers_the_mask_and_full_blocks_are_full(case, bs):
    h, hk, Lq, Lk, doc_k, off, _ = CASES[case]
    off = Lk - Lq if off is None else off
    doc_q = None if doc_k is None else doc_k[:, off:off + Lq]
    b = 2
    dense = R.attention_mask(Lq, Lk, doc_q, doc_k, off).expand(b, 1, Lq, Lk)[:, 0]
    partial, full = blocks_of(KA.block_mask(doc_q, doc_k, off, b, Lq, Lk, "cpu", bs))
    assert not (partial & full).any()
    nq, nk = partial.shape[1:]
    unsorted = case == "unsorted_ids"
    for bi in range(b):
        for i in range(nq):
            for j in range(nk):
                tile = dense[bi, i * bs:(i + 1) * bs, j * bs:(j + 1) * bs]
                ragged = tile.shape != (bs, bs)
                if full[bi, i, j]:
                    assert tile.all() and not ragged, (bi, i, j)
                elif partial[bi, i, j]:
                    assert unsorted or tile.any(), (bi, i, j)  # tight for sorted ids: no empty block is listed
                    assert ragged or not tile.all(), (bi, i, j)  # else it would be full
                else:
                    assert not tile.any(), (bi, i, j)
    if case == "packed" and bs == 4:  # every kind of block occurs
        assert full.any() and partial.any() and not (partial | full).all()


def test_compiled_flex_on_cpu_matches_naive_loop():
    """Inductor's CPU flex kernel uses the block mask (empty blocks skipped, full ones unmasked): GQA, a cache in
    front of the queries, a scale, documents starting mid-row and mid-block, 8-position blocks. Two calls: new
    documents reuse the compiled kernel (the mask's tensors are inputs, not constants)."""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(3)
    b, h, hk, Lq, Lk, d = 2, 4, 2, 20, 32, 16
    q, k, v = (torch.randn(b, n, L, d, generator=g) for n, L in ((h, Lq), (hk, Lk), (hk, Lk)))
    graphs = counters["stats"]["unique_graphs"]
    # (doc_k, the first positions of documents after the cache: (row, query)); query i sits at key 12 + i
    for doc_k, firsts in ((docs([(0, 13), (1, 1), (2, 18)], [(4, 32)]), [(0, 1), (0, 2)]),
                          (docs([(0, 3), (1, 20), (2, 9)], [(6, 16), (7, 16)]), [(0, 11), (1, 4)])):
        out = KA.flex(q, k, v, doc_k[:, Lk - Lq:], doc_k, Lk - Lq, 0.3, compile=True, block_size=8)
        torch.testing.assert_close(out, naive(q, k, v, doc_k=doc_k, scale=0.3).to(F32), rtol=1e-5, atol=1e-5)
        for row, i in firsts:  # the first token of a document sees only itself: its output is its own value
            torch.testing.assert_close(out[row, :, i], v[row].repeat_interleave(h // hk, 0)[:, Lk - Lq + i],
                                       rtol=0, atol=1e-6)
    assert counters["stats"]["unique_graphs"] - graphs <= 1


@pytest.mark.parametrize("impl", ["torch", "flex"])
def test_a_document_starting_mid_row_sees_nothing_before_it(impl):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 24, 8, generator=g) for _ in range(3))
    doc = docs([(0, 9), (1, 15)])
    out = attention(q, k, v, doc_q=doc, impl=impl)
    # the first token of document 1 attends only to itself: its output is its own value
    torch.testing.assert_close(out[0, :, 9], v[0, :, 9], rtol=0, atol=1e-6)
    assert not torch.allclose(out[0, :, 10], v[0, :, 10])
    # changing document 0's keys and values changes nothing in document 1
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :9] += 5.0
    v2[:, :, :9] -= 3.0
    out2 = attention(q, k2, v2, doc_q=doc, impl=impl)
    torch.testing.assert_close(out2[:, :, 9:], out[:, :, 9:], rtol=0, atol=1e-6)
    assert not torch.allclose(out2[:, :, :9], out[:, :, :9])


def test_half_dtypes_run_and_keep_their_dtype():
    q, k, v, kw = make("cache_docs", torch.bfloat16)
    expect = naive(q, k, v, **kw)
    for impl in ("torch", "flex"):
        out = attention(q, k, v, **kw, impl=impl)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.to(F64), expect, rtol=0, atol=3e-2)


def test_triton_impl_on_cpu_runs_flex_eagerly_or_the_reference_under_autograd(monkeypatch):
    from lit_mamba2 import ops

    monkeypatch.setattr(ops, "triton_available", lambda: True)  # ops asks for the package, never imports Triton here
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ops, "_warned", set())
    q, k, v, kw = make("cache_docs", F32)
    expect = naive(q, k, v, **kw).to(F32)
    torch.testing.assert_close(attention(q, k, v, **kw, impl="triton"), expect, rtol=1e-5, atol=1e-5)
    q.requires_grad_()
    with pytest.warns(UserWarning, match=r"attention: flex attention has no backward on cpu; running the reference"):
        out = attention(q, k, v, **kw, impl="triton")
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expect, rtol=1e-5, atol=1e-5)


def test_attention_names_the_argument_that_is_wrong():
    q, k, v = torch.randn(2, 6, 8, 4), torch.randn(2, 2, 12, 4), torch.randn(2, 2, 12, 4)
    doc_k = torch.zeros(2, 12, dtype=I32)
    with pytest.raises(TypeError, match=r"attention: doc_k must have dtype in \['int32'\], got torch.int64"):
        attention(q, k, v, doc_k=doc_k.long())
    with pytest.raises(TypeError, match=r"attention: doc_q must have dtype in \['int32'\]"):
        attention(q, k, v, doc_q=torch.zeros(2, 8), doc_k=doc_k)
    with pytest.raises(ValueError, match=r"attention: doc_k must have shape \(2, 12\), got \(2, 8\)"):
        attention(q, k, v, doc_k=doc_k[:, :8])
    with pytest.raises(ValueError, match=r"attention: doc_q must have shape \(2, 8\), got \(2, 12\)"):
        attention(q, k, v, doc_q=doc_k)
    with pytest.raises(ValueError, match=r"attention: v must have shape \(2, 2, 12, 4\), got \(2, 2, 11, 4\)"):
        attention(q, k, v[:, :, :11])
    with pytest.raises(ValueError, match=r"attention: k must have shape \(2, \*, \*, 4\), got \(2, 2, 12, 3\)"):
        attention(q, k[..., :3], v)
    with pytest.raises(ValueError, match=r"heads \(q's dim 1, 6\) must be divisible by heads_kv \(k's dim 1, 4\)"):
        attention(q, torch.randn(2, 4, 12, 4), torch.randn(2, 4, 12, 4))
    with pytest.raises(ValueError, match=r"attention: q, k and v must have one dtype"):
        attention(q, k.double(), v)
    with pytest.raises(ValueError, match=r"attention: k must have at least as many positions as q"):
        attention(q, k[:, :, :5], v[:, :, :5])
    with pytest.raises(ValueError, match=r"attention: q_offset must be an int in \[0, Lk - Lq = 4\], got 5"):
        attention(q, k, v, q_offset=5)
    with pytest.raises(ValueError, match=r"attention: doc_k is needed when Lk \(12\) > Lq \(8\)"):
        attention(q, k, v, doc_q=doc_k[:, :8])
    with pytest.raises(ValueError, match=r"attention: doc_q must equal doc_k at the queries' positions"):
        attention(q, k, v, doc_q=doc_k[:, :8] + 1, doc_k=doc_k)
    with pytest.raises(ValueError, match=r"attention: impl must be one of"):
        attention(q, k, v, impl="flash")
    with pytest.raises(TypeError, match=r"attention: q must be a torch\.Tensor"):
        attention(q.numpy(), k, v)
