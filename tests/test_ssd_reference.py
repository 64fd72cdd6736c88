"""The three PyTorch forms of SSD (recurrence, quadratic dual form, chunked) agree, and ops.ssd checks its input."""

import math

import pytest
import torch

import lit_mamba2
from lit_mamba2 import reference as R

F64 = torch.float64


def make_inputs(b=2, L=37, h=4, p=8, g=2, n=6, seed=0, docs=((10, 5, 22), (20, 17)), D_hdim=False):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    seq_idx = torch.stack([torch.repeat_interleave(torch.arange(len(d), dtype=torch.int32) * 3, torch.tensor(d))
                           for d in docs]) if docs else None
    return dict(
        x=r(b, L, h, p), dt=r(b, L, h), A=-torch.rand(h, generator=gen, dtype=F64) * 4, B=r(b, L, g, n),
        C=r(b, L, g, n), D=r(h, p) if D_hdim else r(h), z=r(b, L, h, p), dt_bias=r(h),
        initial_states=r(b, h, p, n), seq_idx=seq_idx,
    )


FULL = dict(dt_softplus=True, dt_limit=(0.01, 2.0), return_final_states=True)


@pytest.mark.parametrize("D_hdim", [False, True])
@pytest.mark.parametrize("chunk_size", [4, 16, 64])
def test_three_forms_agree(chunk_size, D_hdim):
    inp = make_inputs(D_hdim=D_hdim)
    y_rec, s_rec = R.ssd_recurrent(chunk_size=None, **inp, **FULL)
    y_quad, s_quad = R.ssd_quadratic(chunk_size=None, **inp, **FULL)
    y_chunk, s_chunk = R.ssd_chunked(chunk_size=chunk_size, **inp, **FULL)
    assert y_rec.shape == inp["x"].shape and s_rec.shape == inp["initial_states"].shape
    for y, s in ((y_quad, s_quad), (y_chunk, s_chunk)):
        torch.testing.assert_close(y, y_rec, rtol=0, atol=1e-10)
        torch.testing.assert_close(s, s_rec, rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant", ["plain", "no_seq_idx", "no_initial", "no_softplus", "ngroups1"])
def test_forms_agree_on_variants(variant):
    inp = make_inputs(docs=None if variant == "no_seq_idx" else ((10, 5, 22), (20, 17)),
                      g=1 if variant == "ngroups1" else 2)
    kw = dict(FULL)
    if variant == "plain":
        for k in ("D", "z", "dt_bias", "initial_states"):
            inp[k] = None
        kw = dict(dt_softplus=True, return_final_states=True)
    if variant == "no_initial":
        inp["initial_states"] = None
    if variant == "no_softplus":  # dt used as given: keep it positive
        inp["dt"] = inp["dt"].abs()
        inp["dt_bias"] = None
        kw["dt_softplus"] = False
        kw["dt_limit"] = (0.0, math.inf)
    y_rec, s_rec = R.ssd_recurrent(**inp, **kw)
    y_chunk, s_chunk = R.ssd_chunked(chunk_size=8, **inp, **kw)
    y_quad, s_quad = R.ssd_quadratic(**inp, **kw)
    for y, s in ((y_chunk, s_chunk), (y_quad, s_quad)):
        torch.testing.assert_close(y, y_rec, rtol=0, atol=1e-10)
        torch.testing.assert_close(s, s_rec, rtol=0, atol=1e-10)


def test_chunked_does_not_depend_on_chunk_size():
    inp = make_inputs(L=100, docs=((30, 70), (1, 99)))
    outs = [R.ssd_chunked(chunk_size=cs, **inp, **FULL) for cs in (1, 7, 16, 32, 128)]
    for y, s in outs[1:]:
        torch.testing.assert_close(y, outs[0][0], rtol=0, atol=1e-10)
        torch.testing.assert_close(s, outs[0][1], rtol=0, atol=1e-10)


def test_documents_are_isolated_and_states_reach_the_right_document():
    """Packed documents give the same outputs as each document run alone; the initial state reaches only the first
    document and the final state is the last document's."""
    lens = (9, 14, 10)
    inp = make_inputs(b=1, L=sum(lens), docs=(lens,))
    y, final = R.ssd_chunked(chunk_size=8, **inp, **FULL)
    start = 0
    for i, n in enumerate(lens):
        part = {k: (v[:, start:start + n] if k in ("x", "dt", "B", "C", "z", "seq_idx") else v) for k, v in inp.items()}
        part["seq_idx"] = None
        if i > 0:
            part["initial_states"] = None
        y_alone, final_alone = R.ssd_recurrent(**part, **FULL)
        torch.testing.assert_close(y[:, start:start + n], y_alone, rtol=0, atol=1e-10)
        start += n
    torch.testing.assert_close(final, final_alone, rtol=0, atol=1e-10)


def test_splitting_a_sequence_with_states_equals_running_it_whole():
    """The identity that chunked prefill and context parallelism build on."""
    inp = make_inputs(L=40, docs=((12, 28), (40,)))
    y, final = R.ssd_chunked(chunk_size=8, **inp, **FULL)
    cut = 17
    first = {k: (v[:, :cut] if k in ("x", "dt", "B", "C", "z", "seq_idx") else v) for k, v in inp.items()}
    second = {k: (v[:, cut:] if k in ("x", "dt", "B", "C", "z", "seq_idx") else v) for k, v in inp.items()}
    y1, mid = R.ssd_chunked(chunk_size=8, **first, **FULL)
    # a state handed across a document boundary must not leak: the second part starts where seq_idx says
    same_doc = (inp["seq_idx"][:, cut] == inp["seq_idx"][:, cut - 1]).to(F64)[:, None, None, None]
    second["initial_states"] = mid * same_doc
    y2, final2 = R.ssd_chunked(chunk_size=8, **second, **FULL)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y, rtol=0, atol=1e-10)
    torch.testing.assert_close(final2, final, rtol=0, atol=1e-10)


def test_chunked_gradients_pass_gradcheck_and_match_the_recurrence():
    inp = make_inputs(b=1, L=7, h=2, p=2, g=1, n=3, docs=((3, 4),))
    names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
    leaves = [inp[k].clone().requires_grad_() for k in names]

    def run(form, *args):
        kw = dict(zip(names, args), seq_idx=inp["seq_idx"])
        y, s = form(chunk_size=4, **kw, **FULL)
        return y, s

    assert torch.autograd.gradcheck(lambda *a: run(R.ssd_chunked, *a), leaves, eps=1e-6, atol=1e-6)
    g_chunk = torch.autograd.grad(sum(t.sum() * (i + 1) for i, t in enumerate(run(R.ssd_chunked, *leaves))), leaves)
    g_rec = torch.autograd.grad(sum(t.sum() * (i + 1) for i, t in enumerate(run(R.ssd_recurrent, *leaves))), leaves)
    for name, a, b in zip(names, g_chunk, g_rec):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=name)


def test_public_op_matches_recurrence_in_low_precision():
    inp = make_inputs()
    inp32 = {k: (v.float() if v is not None and v.is_floating_point() else v) for k, v in inp.items()}
    y, s = lit_mamba2.ssd(chunk_size=16, **inp32, **FULL)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    y_ref, s_ref = R.ssd_recurrent(**inp, **FULL)
    assert (y.double() - y_ref).norm() / y_ref.norm() < 1e-5
    bf = {k: (v.bfloat16() if k in ("x", "B", "C", "z") else v) for k, v in inp32.items()}
    y_bf = lit_mamba2.ssd(chunk_size=16, **bf, dt_softplus=True)
    assert y_bf.dtype == torch.bfloat16 and torch.isfinite(y_bf.float()).all()


def test_public_ops_trace_under_compile_with_dynamic_shapes():
    # the argument checks run inside the traced graph; with symbolic sizes (dynamic=True, or a recompile after a
    # shape change) their messages may only be formatted on failure, or fullgraph tracing breaks
    def f(x, dt, A, B, C, w, nw):
        y, fin = lit_mamba2.ssd(x, dt, A, B, C, 8, dt_softplus=True, return_final_states=True)
        u = lit_mamba2.causal_conv1d(x.flatten(2), w, activation="silu")
        v = lit_mamba2.gated_rmsnorm(u, u.sigmoid(), nw)
        return y.sum() + fin.sum() + v.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for b, L in ((1, 16), (2, 24)):
        inp = make_inputs(b=b, L=L, h=2, p=4, g=1, n=4, docs=())
        args = [inp[k].float() for k in ("x", "dt", "A", "B", "C")]
        w, nw = torch.randn(8, 4), torch.rand(8) + 0.5
        assert torch.allclose(compiled(*args, w, nw), f(*args, w, nw), rtol=1e-4, atol=1e-4)


# ---- bad input ---------------------------------------------------------------------------------------------------
def _good():
    b, L, h, p, g, n = 1, 8, 4, 2, 2, 3
    return dict(x=torch.randn(b, L, h, p), dt=torch.rand(b, L, h), A=-torch.rand(h), B=torch.randn(b, L, g, n),
                C=torch.randn(b, L, g, n), chunk_size=4)


@pytest.mark.parametrize("change, error, words", [
    (dict(x=torch.randn(1, 8, 4)), ValueError, "x must have shape"),
    (dict(dt=torch.rand(1, 8, 3)), ValueError, "dt must have shape (1, 8, 4)"),
    (dict(A=-torch.rand(4, 1)), ValueError, "A must have shape (4)"),
    (dict(B=torch.randn(1, 8, 3, 3), C=torch.randn(1, 8, 3, 3)), ValueError, "divisible by ngroups"),
    (dict(C=torch.randn(1, 8, 2, 5)), ValueError, "B and C must have one shape"),
    (dict(x=torch.randn(1, 8, 4, 2).to(torch.int64)), TypeError, "x must have dtype"),
    (dict(D=torch.randn(3)), ValueError, "D must have shape (4)"),
    (dict(z=torch.randn(1, 8, 4, 3)), ValueError, "z must have shape"),
    (dict(initial_states=torch.randn(1, 4, 2, 4)), ValueError, "initial_states must have shape (1, 4, 2, 3)"),
    (dict(seq_idx=torch.zeros(1, 8, dtype=torch.int64)), TypeError, "seq_idx must have dtype"),
    (dict(seq_idx=torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2]], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(dt_limit=(1.0, 0.5)), ValueError, "dt_limit"),
    (dict(impl="cuda"), ValueError, "impl must be one of"),
    (dict(x="not a tensor"), TypeError, "x must be a torch.Tensor"),
])
def test_ssd_rejects_bad_input_with_a_clear_message(change, error, words):
    kw = {**_good(), **change}
    with pytest.raises(error) as e:
        lit_mamba2.ssd(**kw)
    assert words in str(e.value)


def test_conv1d_and_norm_reject_bad_input():
    with pytest.raises(ValueError, match="weight must have shape"):
        lit_mamba2.causal_conv1d(torch.randn(1, 5, 6), torch.randn(5, 4))
    with pytest.raises(ValueError, match="initial_states must have shape"):
        lit_mamba2.causal_conv1d(torch.randn(1, 5, 6), torch.randn(6, 4), initial_states=torch.randn(1, 6, 4))
    with pytest.raises(ValueError, match="not divisible by group_size"):
        lit_mamba2.gated_rmsnorm(torch.randn(2, 6), None, torch.ones(6), group_size=4)
