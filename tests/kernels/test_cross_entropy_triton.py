"""The fused LM-head cross-entropy (Triton under TRITON_INTERPRET=1 on CPU) against F.cross_entropy on float64
logits."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from lit_mamba2.kernels import cross_entropy

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


CASES = [
    # N, d, V, dtype, reduction, n_ignored, chunk_rows
    (23, 16, 50, torch.float32, "mean", 5, 8),
    (17, 24, 130, torch.float32, "sum", 3, None),
    (30, 32, 5000, torch.float32, "mean", 0, 11),  # a vocabulary longer than one 4096-wide block
    (40, 16, 257, torch.bfloat16, "mean", 7, 16),
    (12, 8, 64, torch.float16, "sum", 12, 5),  # every row ignored: the sum is 0, and so are the gradients
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_linear_cross_entropy_matches_f_cross_entropy(case):
    N, d, V, dtype, reduction, n_ignored, chunk_rows = case
    gen = torch.Generator().manual_seed(CASES.index(case))
    hidden = torch.randn(N, d, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(V, d, generator=gen) / d ** 0.5 * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[torch.randperm(N, generator=gen)[:n_ignored]] = -100
    loss = cross_entropy.linear_cross_entropy(hidden, weight, labels, -100, reduction, chunk_rows)
    assert loss.dtype == torch.float32 and loss.dim() == 0

    rh, rw = (t.detach().double().requires_grad_() for t in (hidden, weight))
    rloss = F.cross_entropy(rh @ rw.t(), labels, ignore_index=-100, reduction=reduction)
    tol = TOL[dtype]
    assert abs(loss.item() - rloss.item()) <= tol * max(1.0, abs(rloss.item()))
    go = torch.tensor(0.7)
    gh, gw = torch.autograd.grad(loss * go, (hidden, weight))
    rgh, rgw = torch.autograd.grad(rloss * go.double(), (rh, rw))
    assert gh.dtype == dtype and gw.dtype == dtype
    if n_ignored == N:
        assert not gh.any() and not gw.any()
    else:
        assert _rel(gh, rgh) < tol and _rel(gw, rgw) < tol


def test_ignore_index_other_than_default_and_no_grad():
    gen = torch.Generator().manual_seed(7)
    hidden, weight = torch.randn(9, 8, generator=gen), torch.randn(20, 8, generator=gen)
    labels = torch.randint(0, 20, (9,), generator=gen)
    labels[2] = labels[5] = 3
    loss = cross_entropy.linear_cross_entropy(hidden, weight, labels, ignore_index=3)
    want = F.cross_entropy(hidden.double() @ weight.double().t(), labels, ignore_index=3)
    assert abs(loss.item() - want.item()) < 1e-5


def test_tied_weight_gradients_accumulate():
    """The LM head tied to the embedding: both uses of the weight contribute to its gradient."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(30, 8, generator=gen, requires_grad=True)
    ids = torch.randint(0, 30, (10,), generator=gen)
    labels = torch.randint(0, 30, (10,), generator=gen)
    loss = cross_entropy.linear_cross_entropy(F.embedding(ids, weight) * 2, weight, labels, chunk_rows=4)
    (g,) = torch.autograd.grad(loss, weight)
    rw = weight.detach().double().requires_grad_()
    (rg,) = torch.autograd.grad(F.cross_entropy((F.embedding(ids, rw) * 2) @ rw.t(), labels), rw)
    assert _rel(g, rg) < 1e-5


def test_traces_under_compile():
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=True)
    labels = torch.randint(0, 40, (10,))

    def f(h, w):
        return cross_entropy.linear_cross_entropy(h, w, labels, chunk_rows=4)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(hidden, weight), (hidden, weight))
    want = torch.autograd.grad(f(hidden, weight), (hidden, weight))
    assert all(torch.allclose(a, b) for a, b in zip(got, want))
