"""The Triton gated RMSNorm (under TRITON_INTERPRET=1 on CPU) against reference.gated_rmsnorm in float64."""

from kernel_testing import interpreter_only, rel  # (first: it sets TRITON_INTERPRET)

import pytest
import torch

pytest.importorskip("triton")
pytestmark = interpreter_only

import lit_mamba2
from lit_mamba2 import reference
from lit_mamba2.kernels import rmsnorm_gated

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


CASES = [
    # leading shape, dim, group_size, has_z, norm_before_gate, dtype, z non-contiguous
    ((2, 7), 48, None, True, False, torch.float32, True),
    ((2, 7), 48, 16, True, True, torch.float32, False),
    ((13,), 40, 8, False, False, torch.float32, False),
    ((3, 2, 5), 96, 24, True, False, torch.bfloat16, True),
    ((9,), 64, None, True, True, torch.float16, False),
    ((4, 33), 20, 10, True, True, torch.bfloat16, True),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_gated_rmsnorm_matches_reference(case):
    lead, D, gs, has_z, nbg, dtype, z_noncontig = case
    gen = torch.Generator().manual_seed(CASES.index(case))
    x = (torch.randn(*lead, D, generator=gen) * 3).to(dtype).requires_grad_()
    if has_z and z_noncontig:  # a slice of a wider projection, as in the model
        z = torch.randn(*lead, D + 5, generator=gen).to(dtype)[..., 2:2 + D].requires_grad_()
    else:
        z = torch.randn(*lead, D, generator=gen).to(dtype).requires_grad_() if has_z else None
    w = (1 + 0.3 * torch.randn(D, generator=gen)).to(dtype).requires_grad_()
    out = lit_mamba2.gated_rmsnorm(x, z, w, 1e-5, gs, nbg, impl="triton")
    assert out.shape == x.shape and out.dtype == dtype
    leaves = [t for t in (x, z, w) if t is not None]
    refs = [t.detach().double().requires_grad_() for t in leaves]
    rx, rw = refs[0], refs[-1]
    rz = refs[1] if has_z else None
    rout = reference.gated_rmsnorm(rx, rz, rw, 1e-5, gs, nbg)
    tol = TOL[dtype]
    assert rel(out, rout) < tol
    g = torch.randn(*lead, D, generator=gen).to(dtype)
    grads = torch.autograd.grad((out.float() * g.float()).sum(), leaves)
    rgrads = torch.autograd.grad((rout * g.double()).sum(), refs)
    for name, a, b in zip(("x", "z", "weight") if has_z else ("x", "weight"), grads, rgrads):
        assert a.dtype == dtype and a.shape == b.shape
        assert rel(a, b) < tol, name


# rmsnorm_gated.CONFIG variants: every launch path the GPU may take, each against float64 (the interpreter ignores
# num_warps and num_stages, so those are left at their defaults)
VARIANTS = {
    "default": {},
    "one_row": dict(fwd_rows=1, bwd_rows=1, z_align=False, bwd_progs_per_sm=2),
    "row_blocks": dict(fwd_rows=4, bwd_rows=2, bwd_progs_per_sm=1, bwd_stages=2),
    "mixed": dict(bwd_rows=4, bwd_progs_per_sm=3),
}
VARIANT_CASES = [
    # rows, dim, group_size, has_z, norm_before_gate, dtype, extra z columns (0: contiguous z)
    (13, 44, None, True, False, torch.float32, 5),  # 44 padded to 64 lanes; z stride 49
    (7, 88, 44, True, True, torch.float32, 6),  # two groups; z stride 94
    (11, 48, 24, False, True, torch.float32, 0),  # no z; groups of 24 padded to 32
    (9, 40, None, True, False, torch.bfloat16, 8),  # bf16, z stride 48 (a multiple of 16)
    (10, 32, 16, True, True, torch.float32, 0),  # power-of-2 groups: no padding
]


def _check_against_reference(M, D, gs, has_z, nbg, dtype, extra, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, D, generator=gen) * 3).to(dtype).requires_grad_()
    z = None
    if has_z:
        z = torch.randn(M, D + extra, generator=gen).to(dtype)[:, extra // 2:extra // 2 + D].requires_grad_()
    w = (1 + 0.3 * torch.randn(D, generator=gen)).to(dtype).requires_grad_()
    g = torch.randn(M, D, generator=gen).to(dtype)
    out = rmsnorm_gated.gated_rmsnorm(x, z, w, 1e-5, gs, nbg)
    leaves = [t for t in (x, z, w) if t is not None]
    grads = torch.autograd.grad((out.float() * g.float()).sum(), leaves)
    refs = [t.detach().double().requires_grad_() for t in leaves]
    rout = reference.gated_rmsnorm(refs[0], refs[1] if has_z else None, refs[-1], 1e-5, gs, nbg)
    rgrads = torch.autograd.grad((rout * g.double()).sum(), refs)
    tol = TOL[dtype]
    assert rel(out, rout) < tol
    for a, b in zip(grads, rgrads):
        assert a.dtype == dtype and rel(a, b) < tol


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gated_rmsnorm_launch_variants(monkeypatch, variant):
    for k, v in VARIANTS[variant].items():
        monkeypatch.setitem(rmsnorm_gated.CONFIG, k, v)
    for i, case in enumerate(VARIANT_CASES):
        _check_against_reference(*case, seed=i)


def test_z_align_hint_divides_the_stride():
    """The hint tells the compiler every row offset is a multiple of it: wrong would mean misaligned wide loads on
    the GPU (the interpreter cannot show that), so check it divides the stride and takes the largest such factor."""
    for s in list(range(1, 70)) + [3352, 10576, 2 ** 20 + 6]:
        t = torch.empty(2, s)[:, :1]
        a = rmsnorm_gated._z_align(t)
        assert s % a == 0 and a <= 16 and (a == 16 or s % (2 * a) != 0)
    assert rmsnorm_gated._z_align(torch.empty(2, 3352)[:, :1536]) == 8


def test_gated_rmsnorm_no_rows():
    x = torch.randn(0, 24, requires_grad=True)
    z = torch.randn(0, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)
    out = rmsnorm_gated.gated_rmsnorm(x, z, w, 1e-5, 8)
    dx, dz, dw = torch.autograd.grad(out.sum(), (x, z, w))
    assert out.shape == (0, 24) and dx.shape == (0, 24) and dz.shape == (0, 24)
    assert torch.equal(dw, torch.zeros(24))


def test_gated_rmsnorm_many_rows_deterministic():
    """More rows than one backward program handles: the weight gradient sums partials in a fixed order."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(70, 32, generator=gen, requires_grad=True)
    z = torch.randn(70, 32, generator=gen, requires_grad=True)
    w = torch.randn(32, generator=gen, requires_grad=True)
    g = torch.randn(70, 32, generator=gen)
    runs = [torch.autograd.grad((rmsnorm_gated.gated_rmsnorm(x, z, w, 1e-5, 8) * g).sum(), (x, z, w))
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    ref = [t.detach().double().requires_grad_() for t in (x, z, w)]
    rg = torch.autograd.grad((reference.gated_rmsnorm(*ref, 1e-5, 8) * g.double()).sum(), ref)
    assert all(rel(a, b) < 1e-5 for a, b in zip(runs[0], rg))


def test_ops_routes_to_triton(monkeypatch):
    called = []
    orig = rmsnorm_gated.gated_rmsnorm
    monkeypatch.setattr(rmsnorm_gated, "gated_rmsnorm", lambda *a: called.append(1) or orig(*a))
    lit_mamba2.gated_rmsnorm(torch.randn(3, 8), None, torch.ones(8), impl="triton")
    assert called


def test_gated_rmsnorm_traces_under_compile():
    x = torch.randn(4, 16, requires_grad=True)
    z = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)

    def f(x, z, w):
        return rmsnorm_gated.gated_rmsnorm(x, z, w, 1e-5, 8, True).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, z, w), (x, z, w))
    want = torch.autograd.grad(f(x, z, w), (x, z, w))
    assert all(torch.allclose(a, b) for a, b in zip(got, want))
