"""torch.library.opcheck of every custom op the Triton kernels register, and their fake kernels against the real
outputs, exactly (shapes, every stride, dtypes, storage offsets).

torch.compile traces the ops with their fake kernels and asserts at run time that the real outputs have the strides
the fakes said (inductor's assert_size_stride). Under the Triton interpreter on CPU this runs the real kernels; the
inputs are laid out as Mamba2Mixer.forward passes them: bf16 activations that are torch.split views of in_proj's
fused (batch, seqlen, 2 d_inner + 2 ngroups d_state + nheads) output (z, xBC, dt; x, B, C split from the conv's
output), fp32 parameters, the conv weight `conv1d.weight[:, 0, :]` (a view of a (C, 1, W) parameter).

Widths: mamba2-130m's (d_model 768, d_inner 1536, conv_dim 1792, width 4, d_state 128, headdim 64, ngroups 1) for
the conv, the gated norm and the LM head, at short sequences. Two narrower: the SSD keeps headdim 64, d_state 128 and
ngroups 1 but has 4 heads instead of 24 (opcheck runs an op about five times and, through aot_dispatch, its backward
twice; at 24 heads one SSD forward + backward takes ~7 s in the interpreter, a single 130m-wide case ~30 s), and the
LM head has 6,000 tokens instead of 50,288 (a full block of the kernel's 4,096 and a masked tail; at 50,288 each
bf16 matmul on the CPU takes about a second). The opcheck cases of the conv and the SSD have batch 1 (the
interpreter's time goes with the number of programs, which grows with the batch); batch 2 comes in the autograd
tests at the end, which check every op call, forward and backward, exactly.

opcheck's faketensor test compares only strides of dimensions longer than 1, and its aot_dispatch test clones the
inputs (non-contiguous views become contiguous), so `_FakeCrossCheck` below compares every lit_mamba2 op call's real
outputs with its fake's on the very same inputs, also inside autograd's backward.
"""

from kernel_testing import interpreter_only  # (first: it sets TRITON_INTERPRET)

import math

import pytest
import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")
pytestmark = interpreter_only

from lit_mamba2.kernels import conv1d, cross_entropy, rmsnorm_gated, ssd  # noqa: E402  (registers the ops)

OPS = torch.ops.lit_mamba2
BF16 = torch.bfloat16

# mamba2-130m
D_MODEL, D_INNER, D_STATE, NGROUPS, HEADDIM, D_CONV = 768, 1536, 128, 1, 64, 4
CONV_DIM = D_INNER + 2 * NGROUPS * D_STATE  # 1792
NHEADS = D_INNER // HEADDIM  # 24: the conv and the norm's widths
SSD_HEADS = 4  # the SSD's (see the module docstring)
VOCAB = 6000  # the LM head's (idem)
# the chunk the SSD op gets for the config's 256 (kernels.ssd.ssd cuts it to CONFIG max_chunk)
MODEL_CHUNK = min(256, ssd.CONFIG["max_chunk"] or 256)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, gen, dtype=torch.float32, scale=1.0, grad=False):
    t = (torch.randn(*shape, generator=gen) * scale).to(dtype)
    return t.requires_grad_(grad)


def _in_proj_out(b, L, nheads, gen, grad=True):
    """z, xBC, dt: torch.split views of one bf16 (b, L, 2 d_inner + 2 ngroups d_state + nheads) tensor (d_mlp = 0)."""
    d_inner = nheads * HEADDIM
    conv_dim = d_inner + 2 * NGROUPS * D_STATE
    fused = _randn(b, L, d_inner + conv_dim + nheads, gen=gen, dtype=BF16, grad=grad)
    return torch.split(fused, [d_inner, conv_dim, nheads], dim=-1)


def _seq_idx(b, L):
    """Two documents per row, the boundary at a different place in each row."""
    seq = torch.zeros(b, L, dtype=torch.int32)
    for i in range(b):
        seq[i, (i + 1) * L // (b + 2):] = 1
    return seq


def _wider(shape, gen, dtype=BF16, extra=5):
    """A non-contiguous tensor of `shape`: a slice of one with a wider last dimension."""
    return _randn(*shape[:-1], shape[-1] + extra, gen=gen, dtype=dtype)[..., extra:]


def _assert_same_meta(real, fake, where):
    real, fake = pytree.tree_leaves(real), pytree.tree_leaves(fake)
    assert len(real) == len(fake), where
    for i, (r, f) in enumerate(zip(real, fake)):
        if not isinstance(r, torch.Tensor):
            continue
        got = (tuple(r.shape), r.stride(), r.dtype, r.storage_offset())
        want = (tuple(f.shape), f.stride(), f.dtype, f.storage_offset())
        assert got == want, f"{where} output {i}: real (shape, strides, dtype, offset) {got}, fake {want}"


class _FakeCrossCheck(TorchDispatchMode):
    """Runs each lit_mamba2 op on the real tensors and its fake kernel on FakeTensors made from them (same sizes and
    strides), and asserts that every output has the same shape, strides (all of them, size-1 dimensions included),
    dtype and storage offset. Records the calls (op name -> list of the real args)."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "lit_mamba2":
            with FakeTensorMode() as mode:
                fargs, fkwargs = pytree.tree_map_only(torch.Tensor, mode.from_tensor, (args, kwargs))
                fake = func(*fargs, **fkwargs)
            _assert_same_meta(out, fake, func.name())
            self.calls.setdefault(func.name().split("::")[1], []).append(args)
        return out


DEFAULT_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _detached(args):
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


def _opcheck(op, args, no_backward=False):
    """opcheck's default tests, then the exact comparison on these very inputs (opcheck's faketensor test ignores
    the strides of size-1 dimensions). no_backward: a call that cannot be differentiated (a _bwd op, which has no
    autograd formula; the loss run without computing gradients). opcheck's autograd_registration test refuses inputs
    none of which requires grad, while with one that does, its aot_dispatch test backpropagates through the op: so
    the first runs on `args` (one requires grad), the others on detached copies."""
    if no_backward:
        assert any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        torch.library.opcheck(op, args, test_utils="test_autograd_registration")
        torch.library.opcheck(op, _detached(args), test_utils=[u for u in DEFAULT_UTILS
                                                               if u != "test_autograd_registration"])
    else:
        torch.library.opcheck(op, args, test_utils=DEFAULT_UTILS)
    with _FakeCrossCheck() as check:
        op(*_detached(args))
    assert list(check.calls) == [op.name().split("::")[1]]


# ---------------------------------------------------------------------------------------------------------------
# causal conv1d: mamba2-130m's 1792 channels, width 4
# ---------------------------------------------------------------------------------------------------------------
def _conv_inputs(b, L, *, seq, init, bias=True, seed=0):
    gen = _gen(seed)
    _, xBC, _ = _in_proj_out(b, L, NHEADS, gen)
    weight = _randn(CONV_DIM, 1, D_CONV, gen=gen, scale=0.5, grad=True)[:, 0, :]  # conv1d.weight[:, 0, :]
    bias_t = _randn(CONV_DIM, gen=gen, grad=True) if bias else None
    seq_idx = _seq_idx(b, L) if seq else None
    # the model's conv state is in the parameters' dtype (Mamba2Mixer.empty_state)
    init_t = _randn(b, CONV_DIM, D_CONV - 1, gen=gen, grad=True) if init else None
    return xBC, weight, bias_t, seq_idx, init_t


CONV_CASES = {  # b, L, seq_idx, initial states, final states, silu, bias
    "train": (1, 8, False, False, False, True, True),
    "packed_states": (1, 8, True, True, True, True, True),
}


@pytest.mark.parametrize("case", CONV_CASES)
def test_opcheck_conv_fwd(case):
    b, L, seq, init, final, silu, bias = CONV_CASES[case]
    x, w, bias_t, seq_idx, init_t = _conv_inputs(b, L, seq=seq, init=init, bias=bias)
    assert not x.is_contiguous() and w._base is not None
    _opcheck(OPS.causal_conv1d_fwd.default, (x, w, bias_t, seq_idx, init_t, silu, final))


CONV_BWD_CASES = {  # b, L, seq_idx, initial states, d final states, silu
    "packed_states": (1, 8, True, True, True, True),
}


@pytest.mark.parametrize("case", CONV_BWD_CASES)
def test_opcheck_conv_bwd(case):
    """The backward op with the forward's saved tensors, a non-contiguous dout and a transposed d final state."""
    b, L, seq, init, dfinal, silu = CONV_BWD_CASES[case]
    gen = _gen(1)
    x, w, bias_t, seq_idx, init_t = (t.detach() if t is not None else None
                                     for t in _conv_inputs(b, L, seq=seq, init=init))
    dout = _wider((b, L, CONV_DIM), gen).requires_grad_()  # opcheck wants an input that requires grad
    dfin = _randn(b, D_CONV - 1, CONV_DIM, gen=gen).transpose(1, 2) if dfinal else None
    assert not dout.is_contiguous()
    _opcheck(OPS.causal_conv1d_bwd.default, (x, w, bias_t, seq_idx, init_t, dout, dfin, silu), no_backward=True)


# ---------------------------------------------------------------------------------------------------------------
# SSD: headdim 64, d_state 128, ngroups 1, 4 heads
# ---------------------------------------------------------------------------------------------------------------
def _ssd_inputs(b, L, *, D_per_p=False, z=False, init=False, seq=False, permuted=False, seed=0):
    """x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx as Mamba2Mixer.forward passes them (z only where the
    model has no gated norm). permuted: x, dt, B, C dense but not contiguous (transposed), where torch.empty_like
    keeps the strides but the kernels' outputs are contiguous."""
    gen = _gen(seed)
    H = SSD_HEADS
    zz, _, dt = _in_proj_out(b, L, H, gen)
    if permuted:
        x = _randn(b, H, L, HEADDIM, gen=gen, dtype=BF16, grad=True).transpose(1, 2)
        dt = _randn(b, H, L, gen=gen, dtype=BF16, grad=True).transpose(1, 2)
        B = _randn(b, NGROUPS, L, D_STATE, gen=gen, dtype=BF16, grad=True).transpose(1, 2)
        C = _randn(b, NGROUPS, L, D_STATE, gen=gen, dtype=BF16, grad=True).transpose(1, 2)
    else:  # x, B, C: split from the conv's (b, L, conv_dim) output
        xBC = _randn(b, L, H * HEADDIM + 2 * NGROUPS * D_STATE, gen=gen, dtype=BF16, grad=True)
        x, B, C = torch.split(xBC, [H * HEADDIM, NGROUPS * D_STATE, NGROUPS * D_STATE], dim=-1)
        x = x.view(b, L, H, HEADDIM)
        B, C = B.view(b, L, NGROUPS, D_STATE), C.view(b, L, NGROUPS, D_STATE)
    A_log = torch.log(torch.rand(H, generator=gen) * 15 + 1).requires_grad_()
    A = -torch.exp(A_log)
    Dp = torch.ones(H * HEADDIM if D_per_p else H, requires_grad=True)
    D = Dp.view(H, HEADDIM) if D_per_p else Dp
    dt_bias = _randn(H, gen=gen, scale=0.5, grad=True)
    z_t = zz.view(b, L, H, HEADDIM) if z else None
    init_t = _randn(b, H, HEADDIM, D_STATE, gen=gen, grad=True) if init else None  # float32, as the kernels take
    seq_idx = _seq_idx(b, L) if seq else None
    return x, dt, A, B, C, D, z_t, dt_bias, init_t, seq_idx


SSD_CASES = {  # b, L, chunk, options, dt_limit (L > chunk 16: several chunks, the last one partial)
    "train": (1, 24, MODEL_CHUNK, {}, (0.0, math.inf)),  # the model's training call
    "packed_states_z": (1, 24, 16, dict(D_per_p=True, z=True, init=True, seq=True), (1e-3, 0.1)),
    # no z and no initial states: their gradients are empty tensors, which must not alias each other
    "permuted_inputs": (1, 20, 16, dict(permuted=True), (0.0, math.inf)),
}


def _ssd_args(case, seed=0, grad=True):
    b, L, cs, opts, limit = SSD_CASES[case]
    x, dt, A, B, C, D, z, dt_bias, init, seq_idx = _ssd_inputs(b, L, seed=seed, **opts)
    args = (x, dt, A, B, C, cs, D, z, dt_bias, init, seq_idx, True, float(limit[0]), float(limit[1]))
    return args if grad else _detached(args)


@pytest.mark.parametrize("case", SSD_CASES)
def test_opcheck_ssd_fwd(case):
    _opcheck(OPS.ssd_fwd.default, _ssd_args(case))


@pytest.mark.parametrize("case", ["packed_states_z", "permuted_inputs"])
def test_opcheck_ssd_bwd(case):
    """The backward op with the forward's saved tensors (states, dt, cumsum, pre-gate y from a real forward), a
    non-contiguous dout and (with initial states) a non-contiguous d final state."""
    gen = _gen(2)
    args = _ssd_args(case, grad=False)
    x, dt, A, B, C, cs, D, z, dt_bias, init, seq_idx, softplus, lo, hi = args
    out, final, states, dtp, cum, ypre = OPS.ssd_fwd(*args)
    dout = _wider(tuple(out.shape), gen).requires_grad_()
    dfinal = _wider(tuple(final.shape), gen, dtype=torch.float32) if init is not None else None
    assert not dout.is_contiguous()
    _opcheck(OPS.ssd_bwd.default, (dout, dfinal, x, dt, A, B, C, cs, D, z, dt_bias, init, seq_idx, softplus, lo, hi,
                                   states, dtp, cum, ypre), no_backward=True)


# ---------------------------------------------------------------------------------------------------------------
# gated RMSNorm: d_inner 1536, one group
# ---------------------------------------------------------------------------------------------------------------
def _norm_inputs(b, L, *, z=True, seed=0):
    gen = _gen(seed)
    zz, _, _ = _in_proj_out(b, L, NHEADS, gen)
    y = _randn(b, L, D_INNER, gen=gen, dtype=BF16, grad=True)  # the SSD's output, reshaped: contiguous
    weight = (1 + _randn(D_INNER, gen=gen, scale=0.1)).requires_grad_()
    return y, zz if z else None, weight


NORM_CASES = {  # b, L, z, group_size, norm_before_gate
    "model": (2, 16, True, D_INNER, False),
    "gate_first_groups": (1, 8, True, D_INNER // 4, True),
    "no_z": (1, 8, False, D_INNER, False),
}


@pytest.mark.parametrize("case", NORM_CASES)
def test_opcheck_norm_fwd(case):
    b, L, z, gs, nbg = NORM_CASES[case]
    y, zz, w = _norm_inputs(b, L, z=z)
    _opcheck(OPS.gated_rmsnorm_fwd.default, (y, zz, w, 1e-5, gs, nbg))


@pytest.mark.parametrize("case", ["model", "gate_first_groups"])
def test_opcheck_norm_bwd(case):
    b, L, z, gs, nbg = NORM_CASES[case]
    y, zz, w = (t.detach() if t is not None else None for t in _norm_inputs(b, L, z=z))
    _, rstd = OPS.gated_rmsnorm_fwd(y, zz, w, 1e-5, gs, nbg)
    dout = _wider((b, L, D_INNER), _gen(3)).requires_grad_()
    _opcheck(OPS.gated_rmsnorm_bwd.default, (dout, y, zz, w, rstd, 1e-5, gs, nbg), no_backward=True)


# ---------------------------------------------------------------------------------------------------------------
# LM head + cross-entropy: d_model 768, vocabulary 6,000 (the backward is in the forward: no backward op)
# ---------------------------------------------------------------------------------------------------------------
LCE_CASES = {  # rows, mean, compute_grad, chunk_rows, transposed weight
    "mean_chunks": (16, True, True, 6, False),
    "sum": (8, False, True, 8, False),
    "no_grad": (8, True, False, 8, False),
    "transposed_weight": (8, True, True, 8, True),
}


def _lce_inputs(n, transposed, seed=0):
    gen = _gen(seed)
    # the backbone's output, flattened, and the tied embedding, both cast to bf16 as autocast runs the LM head
    hidden = _randn(n, D_MODEL, gen=gen, dtype=BF16, grad=True)
    if transposed:  # dense, not contiguous
        weight = _randn(D_MODEL, VOCAB, gen=gen, dtype=BF16, scale=0.02, grad=True).t()
    else:
        weight = _randn(VOCAB, D_MODEL, gen=gen, scale=0.02, grad=True).to(BF16)
    labels = torch.randint(0, VOCAB, (n,), generator=gen)
    labels[::3] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("case", LCE_CASES)
def test_opcheck_linear_cross_entropy(case):
    n, mean, grad, chunk, transposed = LCE_CASES[case]
    hidden, weight, labels = _lce_inputs(n, transposed)
    _opcheck(OPS.linear_cross_entropy_fwd.default, (hidden, weight, labels, -100, mean, grad, chunk),
             no_backward=not grad)


# ---------------------------------------------------------------------------------------------------------------
# bf16 gradients through autograd: every op call (forward and backward) checked against its fake, and the
# gradients' metadata against those of the same forward and backward run on FakeTensors
# ---------------------------------------------------------------------------------------------------------------
def _conv_graph(seed):
    # the model's training call with packed documents (no states: those are in the _bwd op's opcheck above)
    x, w, bias, seq_idx, _ = _conv_inputs(2, 8, seq=True, init=False, seed=seed)
    return (conv1d.causal_conv1d(x, w, bias, seq_idx, None, False, "silu"),), [x, w, bias]


def _ssd_graph(seed):
    x, dt, A, B, C, D, z, dt_bias, init, seq_idx = _ssd_inputs(2, 24, z=True, init=True, seq=True, seed=seed)
    out, final = ssd.ssd(x, dt, A, B, C, 256, D=D, z=z, dt_bias=dt_bias, initial_states=init, seq_idx=seq_idx,
                         dt_softplus=True, return_final_states=True)
    return (out, final), [x, dt, A, B, C, D, z, dt_bias, init]


def _norm_graph(seed):
    y, z, w = _norm_inputs(2, 16, seed=seed)
    return (rmsnorm_gated.gated_rmsnorm(y, z, w, 1e-5, D_INNER, False),), [y, z, w]


def _lce_graph(seed):
    hidden, weight, labels = _lce_inputs(12, False, seed=seed)
    return (cross_entropy.linear_cross_entropy(hidden, weight, labels, chunk_rows=5),), [hidden, weight]


GRAPHS = {
    "causal_conv1d": (_conv_graph, ("causal_conv1d_fwd", "causal_conv1d_bwd")),
    "ssd": (_ssd_graph, ("ssd_fwd", "ssd_bwd")),
    "gated_rmsnorm": (_norm_graph, ("gated_rmsnorm_fwd", "gated_rmsnorm_bwd")),
    "linear_cross_entropy": (_lce_graph, ("linear_cross_entropy_fwd",)),
}


def _grad_outputs(outs, gen):
    """Non-contiguous grad_outputs (slices of wider tensors) in each output's dtype; a scalar loss gets a scalar."""
    return [torch.randn((), generator=gen).to(o.dtype) if o.dim() == 0 else _wider(tuple(o.shape), gen, o.dtype)
            for o in outs]


@pytest.mark.parametrize("name", GRAPHS)
def test_autograd_grads_match_fake(name):
    build, ops = GRAPHS[name]
    with _FakeCrossCheck() as check:
        outs, leaves = build(seed=4)
        gouts = _grad_outputs(outs, _gen(5))
        grads = torch.autograd.grad(outs, leaves, gouts)
    assert set(check.calls) == set(ops)
    if name != "linear_cross_entropy":  # the backward op got the non-contiguous grad_output as it is
        assert not check.calls[ops[1]][0][5 if name == "causal_conv1d" else 0].is_contiguous()
    for leaf, g in zip(leaves, grads):  # bf16 activations get bf16 gradients, fp32 parameters fp32 ones
        assert g is not None and g.dtype == leaf.dtype and g.shape == leaf.shape

    # the same forward and backward on FakeTensors: what torch.compile's tracing sees
    with FakeTensorMode():
        f_outs, f_leaves = build(seed=4)
        f_grads = torch.autograd.grad(f_outs, f_leaves, _grad_outputs(f_outs, _gen(5)))
    _assert_same_meta(outs, f_outs, f"{name} outputs")
    _assert_same_meta(grads, f_grads, f"{name} gradients")
