"""The Triton causal conv1d (under TRITON_INTERPRET=1 on CPU) against reference.causal_conv1d in float64."""

from kernel_testing import interpreter_only, rel  # (first: it sets TRITON_INTERPRET)

import pytest
import torch

pytest.importorskip("triton")
pytestmark = interpreter_only

import lit_mamba2
from lit_mamba2 import reference
from lit_mamba2.kernels import conv1d

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def _seq_idx(b, L, ndocs, gen):
    """Sorted document ids per row with ndocs - 1 random boundaries (documents of length 1 included)."""
    rows = []
    for _ in range(b):
        cuts = torch.randint(1, L, (ndocs - 1,), generator=gen) if L > 1 else torch.empty(0, dtype=torch.long)
        ids = torch.zeros(L, dtype=torch.int32)
        for c in cuts.tolist():
            ids[c:] += 1
        rows.append(ids)
    return torch.stack(rows)


def _run(b, L, D, W, dtype, bias, ndocs, init, final, silu, noncontig, seed):
    gen = torch.Generator().manual_seed(seed)
    if noncontig:  # a slice of a wider projection, as in the model
        big = torch.randn(b, L, D + 7, generator=gen).to(dtype)
        x = big[:, :, 3:3 + D].requires_grad_()
        x_leaf = big
    else:
        x = torch.randn(b, L, D, generator=gen).to(dtype).requires_grad_()
        x_leaf = x
    weight = (torch.randn(D, W, generator=gen) * 0.5).to(dtype).requires_grad_()
    bias_t = torch.randn(D, generator=gen).to(dtype).requires_grad_() if bias else None
    seq_idx = _seq_idx(b, L, ndocs, gen) if ndocs else None
    init_t = torch.randn(b, D, W - 1, generator=gen).to(dtype).requires_grad_() if init else None
    act = "silu" if silu else None

    res = lit_mamba2.causal_conv1d(x, weight, bias_t, seq_idx, init_t, final, act, impl="triton")
    out, fin = res if final else (res, None)
    assert out.shape == (b, L, D) and out.dtype == dtype
    leaves = [t for t in (x, weight, bias_t, init_t) if t is not None]
    refs = [t.detach().double().requires_grad_() for t in leaves]
    rmap = dict(zip(map(id, leaves), refs))
    rres = reference.causal_conv1d(rmap[id(x)], rmap[id(weight)], rmap.get(id(bias_t)), seq_idx,
                                   rmap.get(id(init_t)), final, act)
    rout, rfin = rres if final else (rres, None)

    tol = TOL[dtype]
    assert rel(out, rout) < tol
    gout = torch.randn(b, L, D, generator=gen).to(dtype)
    loss, rloss = (out.float() * gout.float()).sum(), (rout * gout.double()).sum()
    if final:
        assert fin.shape == (b, D, W - 1) and fin.dtype == torch.float32
        assert rel(fin, rfin) == 0.0 or rel(fin, rfin) < 1e-7  # a copy of inputs: exact
        gfin = torch.randn(b, D, W - 1, generator=gen)
        loss, rloss = loss + (fin * gfin).sum(), rloss + (rfin * gfin.double()).sum()
    grads = torch.autograd.grad(loss, leaves)
    rgrads = torch.autograd.grad(rloss, refs)
    for name, g, rg in zip(("x", "weight", "bias", "initial_states"), grads, rgrads):
        assert g.dtype == dtype
        assert rel(g, rg) < tol, name


CASES = [
    # b, L, D, W, dtype, bias, ndocs, init, final, silu, noncontig
    (2, 37, 20, 4, torch.float32, True, 0, False, False, True, False),
    (2, 70, 33, 4, torch.float32, True, 4, True, True, True, True),
    (1, 65, 130, 3, torch.float32, False, 3, True, True, False, False),
    (3, 5, 8, 2, torch.float32, True, 2, True, True, True, False),
    (2, 2, 6, 4, torch.float32, True, 2, True, True, True, False),  # seqlen shorter than the window
    (2, 90, 24, 4, torch.bfloat16, True, 5, True, True, True, True),
    (1, 40, 16, 3, torch.float16, True, 0, True, False, True, False),
    (2, 30, 12, 1, torch.float32, True, 3, False, False, True, False),  # width 1 (reference lacks final states there)
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_conv1d_matches_reference(case):
    _run(*case, seed=CASES.index(case))


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_conv1d_backward_small_tiles(monkeypatch, case):
    """The backward's two passes with tiles smaller than the sequence and the channels, so that g's shifts cross
    tile edges (the default tiles cover these shapes whole)."""
    monkeypatch.setattr(conv1d, "BWD_TILES", ((16, 16, 4), (32, 16, 4)))
    _run(*case, seed=CASES.index(case) + 200)


def test_conv1d_single_document_per_position():
    """Every position its own document: only the current tap survives, and the initial state reaches position 0."""
    b, L, D, W = 2, 12, 8, 4
    seq_idx = torch.arange(L, dtype=torch.int32).expand(b, L).contiguous()
    x = torch.randn(b, L, D, requires_grad=True)
    w = torch.randn(D, W)
    init = torch.randn(b, D, W - 1)
    out = conv1d.causal_conv1d(x, w, None, seq_idx, init, False, None)
    assert torch.allclose(out[:, 1:], x[:, 1:] * w[:, -1], atol=1e-6)
    assert torch.allclose(out[:, 0], x[:, 0] * w[:, -1] + (init * w[:, :-1]).sum(-1), atol=1e-6)


def test_conv1d_deterministic():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 80, 40, generator=gen, requires_grad=True)
    w = torch.randn(40, 4, generator=gen, requires_grad=True)
    g = torch.randn(2, 80, 40, generator=gen)
    runs = [torch.autograd.grad((conv1d.causal_conv1d(x, w) * g).sum(), (x, w)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_ops_routes_to_triton(monkeypatch):
    called = []
    orig = conv1d.causal_conv1d
    monkeypatch.setattr(conv1d, "causal_conv1d", lambda *a: called.append(1) or orig(*a))
    x = torch.randn(1, 6, 4)
    lit_mamba2.causal_conv1d(x, torch.randn(4, 4), impl="triton")
    assert called


def test_conv1d_traces_under_compile():
    """The custom op (fake impl + registered autograd) traces into one graph, forward and backward."""
    x = torch.randn(2, 9, 6, requires_grad=True)
    w = torch.randn(6, 3, requires_grad=True)
    init = torch.randn(2, 6, 2, requires_grad=True)

    def f(x, w, init):
        out, fin = conv1d.causal_conv1d(x, w, None, None, init, True, "silu")
        return out.sum() + fin.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, w, init), (x, w, init))
    want = torch.autograd.grad(f(x, w, init), (x, w, init))
    assert all(torch.allclose(a, b) for a, b in zip(got, want))


def test_widths_past_four_take_the_pytorch_path(monkeypatch):
    """The backward keeps four taps: a wider conv asked of Triton is refused; chosen by default (on CUDA), it runs
    the PyTorch path with a warning, and its gradients are the reference's."""
    from lit_mamba2 import ops

    x = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="widths 1-4, got 5"):
        lit_mamba2.causal_conv1d(x.float(), w.float(), impl="triton")
    monkeypatch.setattr(ops, "_choose", lambda impl, *tensors, op: "triton")  # as on CUDA
    monkeypatch.setattr(conv1d, "causal_conv1d", lambda *a: pytest.fail("the width-4 kernel ran"))
    with pytest.warns(UserWarning, match="running the PyTorch path"):
        out = lit_mamba2.causal_conv1d(x, w)
    gx, gw = torch.autograd.grad(out.square().sum(), [x, w])
    ref = reference.causal_conv1d(x, w, None, None, None, False, "silu")
    rx, rw = torch.autograd.grad(ref.square().sum(), [x, w])
    assert rel(out, ref) == 0 and rel(gx, rx) == 0 and rel(gw, rw) == 0
