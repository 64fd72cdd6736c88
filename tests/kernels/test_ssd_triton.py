"""The Triton SSD kernels (interpreted on CPU) against the float64 chunked reference: forward and every gradient.

Tolerances are on ‖out − ref‖ / ‖ref‖. float32 inputs: the kernels do float32 arithmetic with ieee products,
which lands near 1e-7, so 1e-4 leaves room for summation order without hiding a wrong term (a missing term moves the
error to O(1)). bfloat16 inputs: outputs and gradients are rounded to bfloat16 (2^-9 ≈ 2e-3 relative per element)
and so are the dot operands inside; 3e-2 is a few of those roundings compounded. The interpreter multiplies bfloat16
operands in float32 (it cannot multiply bfloat16), so the kernels' bfloat16 loads, stores and casts are exercised
here and the rounding of dot operands only on the GPU (benchmarks/check_ssd_gpu.py).
"""

import math
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import lit_mamba2  # noqa: E402
from lit_mamba2 import reference  # noqa: E402
from lit_mamba2.kernels import ssd as ssd_kernels  # noqa: E402

GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def _rel(a, r):
    a, r = a.double(), r.double()
    return ((a - r).norm() / r.norm().clamp_min(1e-30)).item()


def _inputs(b, L, h, p, g, n, dtype, *, D="head", z=True, dt_bias=True, init=True, docs=0, A_scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(dt)

    x = rnd(b, L, h, p)
    dt = (rnd(b, L, h, dt=torch.float32) * 0.5 - 1.0).to(dtype)
    A = -(torch.rand(h, generator=gen) * 2 + 0.5) * A_scale
    B, C = rnd(b, L, g, n), rnd(b, L, g, n)
    Dt = {"head": rnd(h, dt=torch.float32), "headdim": rnd(h, p, dt=torch.float32), None: None}[D]
    zt = rnd(b, L, h, p) if z else None
    bias = torch.rand(h, generator=gen) * 0.5 - 0.25 if dt_bias else None
    h0 = rnd(b, h, p, n, dt=torch.float32) if init else None
    seq = None
    if docs:
        # random document boundaries per row, the first document never empty
        seq = torch.zeros(b, L, dtype=torch.int32)
        for i in range(b):
            cuts = torch.randperm(L - 1, generator=gen)[:docs] + 1
            for cut in cuts:
                seq[i, cut:] += 1
    return x, dt, A, B, C, Dt, zt, bias, h0, seq


@pytest.fixture
def chunk_as_given(monkeypatch):
    """The kernels at the chunk size a test asks for, not cut to CONFIG max_chunk (for tests of chunk-256 paths)."""
    monkeypatch.setitem(ssd_kernels.CONFIG, "max_chunk", None)


def _check(cs, shape, dtype, *, softplus=True, limit=(0.0, math.inf), final=True, tol=None, conditioning=False, **kw):
    """conditioning=True: a gradient that is a small difference of large terms (dA under strong decay) may miss by
    up to 10x what the float32 reference itself misses by; that is the problem's conditioning, not the kernel."""
    x, dt, A, B, C, D, z, bias, h0, seq = _inputs(*shape, dtype, **kw)
    leaves = [x, dt, A, B, C, D, z, bias, h0]
    ours = [t.clone().requires_grad_() if t is not None else None for t in leaves]
    refs = [t.double().requires_grad_() if t is not None else None for t in leaves]
    out = ssd_kernels.ssd(*ours[:5], cs, *ours[5:], seq, softplus, limit, final)
    ref = reference.ssd_chunked(*refs[:5], cs, *refs[5:], seq, softplus, limit, final)
    y, fin = out if final else (out, None)
    yr, finr = ref if final else (ref, None)
    assert y.dtype == x.dtype and y.shape == x.shape
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=gen)
    loss, loss_r = (y.float() * gy).sum(), (yr * gy.double()).sum()
    if final:
        assert fin.dtype == torch.float32 and fin.shape == (shape[0], shape[2], shape[3], shape[5])
        gf = torch.randn(fin.shape, generator=gen)
        loss, loss_r = loss + (fin * gf).sum(), loss_r + (finr * gf.double()).sum()
    names = [nm for nm, t in zip(GRAD_NAMES, leaves) if t is not None]
    grads = torch.autograd.grad(loss, [t for t in ours if t is not None])
    grads_r = torch.autograd.grad(loss_r, [t for t in refs if t is not None])
    tol = tol or (1e-4 if dtype == torch.float32 else 3e-2)
    errs = {"y": _rel(y, yr)}
    if final:
        errs["final"] = _rel(fin, finr)
    for nm, gr, grr, leaf in zip(names, grads, grads_r, [t for t in leaves if t is not None]):
        assert gr.dtype == leaf.dtype and gr.shape == leaf.shape, nm
        errs["d" + nm] = _rel(gr, grr)
    for v in [y] + list(grads) + ([fin] if final else []):
        assert torch.isfinite(v).all()
    tols = dict.fromkeys(errs, tol)
    if conditioning:
        ref32 = [t.float().requires_grad_() if t is not None else None for t in leaves]
        out32 = reference.ssd_chunked(*ref32[:5], cs, *ref32[5:], seq, softplus, limit, final)
        y32, fin32 = out32 if final else (out32, None)
        loss32 = (y32 * gy).sum() + ((fin32 * gf).sum() if final else 0)
        for nm, g32, grr in zip(names, torch.autograd.grad(loss32, [t for t in ref32 if t is not None]), grads_r):
            tols["d" + nm] = max(tol, 10 * _rel(g32, grr))
    bad = {k: v for k, v in errs.items() if not v < tols[k]}
    assert not bad, f"relative errors over {tol}: {bad} (all: {errs})"


# (batch, seqlen, nheads, headdim, ngroups, dstate)
@pytest.mark.parametrize("cs,shape,kw", [
    (16, (2, 37, 4, 16, 2, 16), dict(docs=2)),  # ragged, ngroups 2, documents, every option
    (32, (1, 70, 2, 32, 1, 32), dict(D="headdim", limit=(0.01, 2.0))),
    (64, (2, 100, 2, 48, 1, 24), dict(D=None, z=False, dt_bias=False, init=False, softplus=False)),
    (64, (1, 130, 3, 32, 3, 16), dict(docs=3, init=True)),  # ngroups = nheads
    (128, (1, 150, 2, 32, 2, 64), dict(docs=1, D="headdim", z=False)),
    (256, (1, 270, 1, 16, 1, 16), dict(init=False, dt_bias=False)),
])
def test_float32_matches_reference(cs, shape, kw):
    limit = kw.pop("limit", (0.0, math.inf))
    softplus = kw.pop("softplus", True)
    _check(cs, shape, torch.float32, limit=limit, softplus=softplus, **kw)


def test_no_final_states_and_no_documents():
    _check(32, (2, 50, 2, 16, 1, 16), torch.float32, final=False, docs=0)


def test_documents_at_chunk_edges():
    # boundaries exactly at, one before and one after a chunk edge; the initial state must stop at the first one
    x, dt, A, B, C, D, z, bias, h0, _ = _inputs(1, 96, 2, 16, 1, 16, torch.float32)
    seq = torch.zeros(1, 96, dtype=torch.int32)
    for cut in (31, 32, 65):
        seq[:, cut:] += 1
    leaves = [x, dt, A, B, C, D, z, bias, h0]
    ours = [t.clone().requires_grad_() for t in leaves]
    refs = [t.double().requires_grad_() for t in leaves]
    y, fin = ssd_kernels.ssd(*ours[:5], 32, *ours[5:], seq, True, (0.0, math.inf), True)
    yr, finr = reference.ssd_chunked(*refs[:5], 32, *refs[5:], seq, True, (0.0, math.inf), True)
    assert _rel(y, yr) < 1e-4 and _rel(fin, finr) < 1e-4
    g = torch.autograd.grad(y.sum() + fin.sum(), ours)
    gr = torch.autograd.grad(yr.sum() + finr.sum(), refs)
    for nm, a, r in zip(GRAD_NAMES, g, gr):
        assert _rel(a, r) < 1e-4, nm


@pytest.mark.parametrize("cs,shape,kw", [
    (16, (2, 40, 4, 32, 2, 32), dict(docs=2, D="headdim")),
    (64, (1, 90, 2, 64, 1, 64), dict()),
])
def test_bfloat16_matches_reference(cs, shape, kw):
    _check(cs, shape, torch.bfloat16, **kw)


def test_float16_matches_reference():
    # float16 keeps 3 more mantissa bits than bfloat16; the same 3e-2 bound is loose for it but catches any wrong term
    _check(32, (1, 70, 2, 32, 1, 32), torch.float16, docs=1, D="headdim")


def test_large_decay_and_dt_limit_stay_finite():
    # |A| dt up to 500 per step: exp underflows to 0 everywhere it should, never inf/NaN
    _check(32, (1, 64, 2, 16, 1, 16), torch.float32, A_scale=50.0, limit=(0.0, 10.0), docs=1,
           conditioning=True)


def test_deterministic():
    x, dt, A, B, C, D, z, bias, h0, seq = _inputs(1, 40, 2, 16, 1, 16, torch.float32, docs=1)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, z, bias, h0)]
        y, fin = ssd_kernels.ssd(*leaves[:5], 16, *leaves[5:], seq, True, (0.0, math.inf), True)
        runs.append([y, fin, *torch.autograd.grad(y.sum() + fin.sum(), leaves)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_public_op_routes_to_triton(monkeypatch):
    calls = []
    real = ssd_kernels.ssd

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(ssd_kernels, "ssd", spy)
    x, dt, A, B, C, D, z, bias, h0, seq = _inputs(1, 20, 2, 16, 1, 16, torch.float32)
    y = lit_mamba2.ssd(x, dt, A, B, C, 16, D=D, z=z, dt_bias=bias, dt_softplus=True, impl="triton")
    assert len(calls) == 1
    yr = reference.ssd_chunked(x.double(), dt.double(), A.double(), B.double(), C.double(), 16, D.double(),
                               z.double(), bias.double(), None, None, True)
    assert _rel(y, yr) < 1e-4


def test_float64_is_rejected_with_a_clear_error():
    x, dt, A, B, C, *_ = _inputs(1, 16, 1, 16, 1, 16, torch.float64, D=None, z=False, dt_bias=False, init=False)
    with pytest.raises(TypeError, match="float64"):
        ssd_kernels.ssd(x, dt, A, B, C, 16)


def test_torch_compile_fullgraph_traces_the_custom_op():
    # aot_eager traces forward and backward through the op's fake impls exactly as inductor would, without
    # compiling C++ on the CI machine
    x, dt, A, B, C, D, z, bias, h0, seq = _inputs(1, 24, 2, 16, 1, 16, torch.float32, docs=1)

    def f(x, dt, A, B, C, D, z, bias, h0):
        y, fin = ssd_kernels.ssd(x, dt, A, B, C, 16, D, z, bias, h0, seq, True, (0.0, math.inf), True)
        return y.sum() + fin.square().sum()

    leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, z, bias, h0)]
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss_c = compiled(*leaves)
    g_c = torch.autograd.grad(loss_c, leaves)
    loss_e = f(*leaves)
    g_e = torch.autograd.grad(loss_e, leaves)
    assert torch.allclose(loss_c, loss_e)
    for a, b in zip(g_c, g_e):
        assert torch.allclose(a, b)


def test_fake_impl_matches_real_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, dt, A, B, C, D, z, bias, h0, seq = _inputs(2, 40, 2, 16, 1, 32, torch.float32)
    real = torch.ops.lit_mamba2.ssd_fwd(x, dt, A, B, C, 16, D, z, bias, h0, None, True, 0.0, math.inf)
    with FakeTensorMode() as mode:
        fake_in = [mode.from_tensor(t) for t in (x, dt, A, B, C, D, z, bias, h0)]
        fake = torch.ops.lit_mamba2.ssd_fwd(*fake_in[:5], 16, *fake_in[5:], None, True, 0.0, math.inf)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype


@pytest.mark.parametrize("cb_share", [1, 10**9])
def test_precomputed_and_recomputed_cb_paths(monkeypatch, cb_share):
    # with bwd_cbt off, dx loads C·B (precomputed once per group when enough heads share it) or recomputes it
    monkeypatch.setitem(ssd_kernels.CONFIG, "cb_min_heads_per_group", cb_share)
    monkeypatch.setitem(ssd_kernels.CONFIG, "cb_min_dstate", 0)
    monkeypatch.setitem(ssd_kernels.CONFIG, "bwd_cbt", False)  # dx loads or recomputes C·B (tests/.../bwd_paths: cbt)
    _check(32, (2, 75, 4, 16, 2, 16), torch.float32, docs=2)


@pytest.mark.parametrize("fold,cb_share,docs,A_scale", [
    (True, 1, 3, 1.0), (True, 1, 0, 1.0), (True, 10**9, 0, 1.0), (False, 1, 0, 1.0), (True, 1, 0, 8.0), (False, 1, 3, 8.0)])
def test_many_blocks_per_chunk(monkeypatch, chunk_as_given, fold, cb_share, docs, A_scale):
    # chunk 256 = 4 blocks of 64: off-diagonal tiles (decay folded into the operands or not, C·B loaded or
    # recomputed), the tile-pair order of the dCB kernel and its per-tile d cum slots, 2 heads per group;
    # documents cut inside and across blocks; A_scale 8: |A| dt large enough that diagonal blocks take the exact path
    monkeypatch.setitem(ssd_kernels.CONFIG, "fold_decay", fold)
    monkeypatch.setitem(ssd_kernels.CONFIG, "out_fold_decay", fold)
    monkeypatch.setitem(ssd_kernels.CONFIG, "cb_min_heads_per_group", cb_share)
    monkeypatch.setitem(ssd_kernels.CONFIG, "cb_min_dstate", 0)
    monkeypatch.setitem(ssd_kernels.CONFIG, "bwd_cbt", False)
    _check(256, (1, 300, 4, 16, 2, 16), torch.float32, docs=docs, A_scale=A_scale, conditioning=A_scale > 1)


@pytest.mark.parametrize("max_chunk", [None, 128, 64])
def test_long_chunks_run_as_shorter_chunks(monkeypatch, max_chunk):
    # CONFIG max_chunk computes a chunk of 256 as chunks of 128 (or 64): the same function, checked against the
    # float64 reference at chunk 256, with documents and initial states crossing the extra boundaries
    monkeypatch.setitem(ssd_kernels.CONFIG, "max_chunk", max_chunk)
    seen = []
    real = torch.ops.lit_mamba2.ssd_fwd

    def spy(*args):
        seen.append(args[5])  # the chunk size the op was given
        return real(*args)

    monkeypatch.setattr(torch.ops.lit_mamba2, "ssd_fwd", spy)
    _check(256, (1, 300, 2, 16, 1, 16), torch.float32, docs=2)
    assert seen and set(seen) == {max_chunk or 256}


@pytest.mark.parametrize("chunk_size", [1, 8, 100, 512])
def test_any_chunk_size_gives_the_same_function(chunk_size):
    """chunk_size only cuts the work: sizes the kernels do not take run as the nearest power of two they do."""
    x, dt, A, B, C, D, z, bias, h0, seq = _inputs(1, 40, 2, 16, 1, 16, torch.float32)
    y = lit_mamba2.ssd(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=bias, dt_softplus=True, impl="triton")
    yr = reference.ssd_recurrent(x.double(), dt.double(), A.double(), B.double(), C.double(), None, D.double(),
                                 z.double(), bias.double(), None, None, True)
    assert _rel(y, yr) < 1e-4


def test_headdim_past_128_is_refused_by_the_kernels():
    x, dt, A, B, C, *_ = _inputs(1, 16, 1, 160, 1, 16, torch.float32, D=None, z=False, dt_bias=False, init=False)
    with pytest.raises(ValueError, match="headdim <= 128, got 160"):
        lit_mamba2.ssd(x, dt, A, B, C, 16, impl="triton")
