"""The fused LM-head cross-entropy (Triton under TRITON_INTERPRET=1 on CPU) against F.cross_entropy on float64
logits."""

from kernel_testing import interpreter_only, rel  # (first: it sets TRITON_INTERPRET)

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
pytestmark = interpreter_only

from lit_mamba2.kernels import cross_entropy

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


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
        assert rel(gh, rgh) < tol and rel(gw, rgw) < tol


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
    assert rel(g, rg) < 1e-5


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


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_model_loss_routes_through_fused_cross_entropy(monkeypatch, reduction):
    """Mamba2LMHeadModel.loss with the Triton path equals the reference path (loss and gradients), and really calls
    the fused kernel. The SSD stays on the reference (this test is about the loss)."""
    from lit_mamba2 import Mamba2Config, ops
    from lit_mamba2.model import Mamba2LMHeadModel

    real_ssd = ops.ssd
    monkeypatch.setattr(ops, "ssd", lambda *a, **k: real_ssd(*a, **{**k, "impl": "torch"}))
    calls = []
    real_lce = cross_entropy.linear_cross_entropy
    monkeypatch.setattr(cross_entropy, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real_lce(*a, **k))

    torch.manual_seed(0)
    model = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test"))
    ids = torch.randint(0, 256, (2, 12))
    labels = torch.randint(0, 256, (2, 12))
    labels[0, :3] = -100
    seq_idx = torch.tensor([[0] * 5 + [1] * 7, [0] * 12], dtype=torch.int32)
    params = [p for p in model.parameters()]

    def loss_and_grads(impl):
        model.set_impl(impl)
        loss = model.loss(ids, labels, seq_idx=seq_idx, reduction=reduction)
        return loss, torch.autograd.grad(loss, params)

    loss, grads = loss_and_grads("triton")
    assert calls
    ref_loss, ref_grads = loss_and_grads("torch")
    assert len(calls) == 1
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * max(1.0, abs(ref_loss.item()))
    for g, rg in zip(grads, ref_grads):
        assert rel(g, rg) < 1e-4


def test_model_loss_refuses_labels_outside_the_vocabulary_and_gives_per_position_losses():
    """As F.cross_entropy does on either path: a label past the vocabulary (or negative, not ignore_index) is an
    error, not another row's logit; reduction="none" is the (batch, seqlen) losses, the same on both paths."""
    from lit_mamba2 import Mamba2Config
    from lit_mamba2.model import Mamba2LMHeadModel

    torch.manual_seed(0)
    model = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test"))
    ids, labels = torch.randint(0, 256, (2, 12)), torch.randint(0, 256, (2, 12))
    labels[0, :3] = -100
    for impl in ("triton", "torch"):
        model.set_impl(impl)
        for bad in (300, -5):
            wrong = labels.clone()
            wrong[1, 4] = bad
            with pytest.raises((RuntimeError, IndexError)):
                model.loss(ids, wrong)
    per = {impl: model.set_impl(impl).loss(ids, labels, reduction="none") for impl in ("triton", "torch")}
    assert per["triton"].shape == (2, 12) and (per["triton"][0, :3] == 0).all()
    logits = model(ids).double()
    expect = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    assert rel(per["triton"], expect.view(2, 12)) < 1e-5 and rel(per["torch"], per["triton"]) < 1e-5


def test_autocast_runs_the_head_in_the_autocast_dtype():
    """Under autocast the fused path does what autocast does to the unfused one: a bf16 matmul, fp32 gradients
    for fp32 leaves."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(16, 32, generator=gen, requires_grad=True)
    weight = (torch.randn(70, 32, generator=gen) / 4).requires_grad_()
    labels = torch.randint(0, 70, (16,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cross_entropy.linear_cross_entropy(hidden, weight, labels, chunk_rows=6)
        ref = F.cross_entropy((hidden @ weight.t()).float(), labels)
    g, rg = torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(ref, (hidden, weight))
    assert abs(loss.item() - ref.item()) < 1e-3
    assert all(a.dtype == torch.float32 and rel(a, b) < 2e-2 for a, b in zip(g, rg))
