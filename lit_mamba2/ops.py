"""The public ops: argument checks where input first enters, then the one place that picks an implementation.

impl=None picks the Triton kernels for CUDA tensors and the PyTorch reference otherwise; impl="triton" forces the
kernels (on CPU they need TRITON_INTERPRET=1), impl="torch" forces the reference. `attention` takes one more,
impl="flex" (flex attention on any device); its "triton" is SDPA's flash kernel or flex attention compiled to Triton.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from lit_mamba2 import reference

INF = math.inf
IMPLS = (None, "torch", "triton")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(cond: bool, msg):
    # msg: a string, or a function making one only on failure: under torch.compile with dynamic shapes an f-string
    # of a symbolic size cannot be traced, and formatting messages that are never shown costs every call
    if not cond:
        raise ValueError(msg() if callable(msg) else msg)


def _check_tensor(name, t, shape, dtypes=_FLOATS, op="ssd"):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    _check(t.dim() == len(shape) and all(s is None or s == ts for s, ts in zip(shape, t.shape)),
           lambda: f"{op}: {name} must have shape ({', '.join('*' if s is None else str(s) for s in shape)}), "
           f"got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype in {[str(d).split('.')[-1] for d in dtypes]}, got {t.dtype}")


def _one_device(*tensors, op):
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    return devices


def _choose(impl, *tensors, op):
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    devices = _one_device(*tensors, op=op)
    if impl is None:  # the kernels compute in float32: float64 work (checks, oracles) stays on the reference
        float64 = any(t is not None and t.dtype == torch.float64 for t in tensors)
        impl = "triton" if next(iter(devices)).type == "cuda" and not float64 and triton_available() else "torch"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: impl='triton' needs the triton package (pip install 'lit-mamba2[triton]')")
        if next(iter(devices)).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"{op}: impl='triton' on {next(iter(devices))} tensors needs TRITON_INTERPRET=1 "
                               "set before triton is imported")
    return impl


_warned: set = set()


def _within_kernel_limits(chosen: str, asked, fits: bool, why: str) -> str:
    """Shapes the Triton kernels do not take: an error if impl='triton' was asked for, else the PyTorch path (with
    a warning, once: it is slower)."""
    if chosen != "triton" or fits:
        return chosen
    if asked == "triton":
        raise ValueError(why + "; use impl='torch'")
    if why not in _warned:
        _warned.add(why)
        warnings.warn(why + "; running the PyTorch path instead")
    return "torch"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def ssd(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
        dt_softplus=False, dt_limit=(0.0, INF), return_final_states=False, *, impl=None):
    """Structured state space duality (Mamba-2's SSM), in `mamba_chunk_scan_combined`'s argument order and layouts.

    x, z: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads); A: (nheads,) (negative for decay);
    B, C: (batch, seqlen, ngroups, dstate); D: (nheads,) or (nheads, headdim); dt_bias: (nheads,);
    initial_states and the final states: (batch, nheads, headdim, dstate), float32 (float64 for float64 inputs);
    seq_idx: int32 (batch, seqlen), non-decreasing along each row; the state resets where it changes.
    Returns y like x, and the final states when return_final_states.
    """
    _check_tensor("x", x, (None, None, None, None))
    b, L, h, p = x.shape
    _check(L > 0 and b > 0, lambda: f"ssd: x must have batch and seqlen > 0, got {tuple(x.shape)}")
    _check_tensor("dt", dt, (b, L, h))
    _check_tensor("A", A, (h,))
    _check_tensor("B", B, (b, L, None, None))
    _check_tensor("C", C, (b, L, None, None))
    _check(B.shape == C.shape, lambda: f"ssd: B and C must have one shape (batch, seqlen, ngroups, dstate), got "
           f"{tuple(B.shape)} and {tuple(C.shape)}")
    g, n = B.shape[2], B.shape[3]
    _check(h % g == 0, lambda: f"ssd: nheads ({h}) must be divisible by ngroups ({g}, B's dim 2)")
    _check(isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size > 0,
           lambda: f"ssd: chunk_size must be a positive int, got {chunk_size!r}")
    if D is not None:
        _check_tensor("D", D, (h,) if not isinstance(D, torch.Tensor) or D.dim() == 1 else (h, p))
    if z is not None:
        _check_tensor("z", z, (b, L, h, p))
    if dt_bias is not None:
        _check_tensor("dt_bias", dt_bias, (h,))
    if initial_states is not None:
        _check_tensor("initial_states", initial_states, (b, h, p, n))
    if seq_idx is not None:
        _check_tensor("seq_idx", seq_idx, (b, L), dtypes=(torch.int32,))
        if not torch.compiler.is_compiling() and seq_idx.device.type == "cpu" and L > 1:
            _check(bool((seq_idx[:, 1:] >= seq_idx[:, :-1]).all()), "ssd: seq_idx must be non-decreasing along each row")
    _check(isinstance(dt_limit, (tuple, list)) and len(dt_limit) == 2 and 0.0 <= dt_limit[0] < dt_limit[1],
           lambda: f"ssd: dt_limit must be (low, high) with 0 <= low < high, got {dt_limit}")
    impl = _within_kernel_limits(_choose(impl, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, op="ssd"),
                                 impl, p <= 128, f"ssd: the Triton kernels take headdim <= 128, got {p}")
    args = (x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, tuple(dt_limit),
            return_final_states)
    if impl == "triton":
        from lit_mamba2.kernels import ssd as ssd_kernels

        return ssd_kernels.ssd(*args)
    return reference.ssd_chunked(*args)


def causal_conv1d(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                  activation="silu", *, impl=None):
    """Depthwise causal conv1d. x: (batch, seqlen, dim); weight: (dim, width); states: (batch, dim, width - 1)."""
    op = "causal_conv1d"
    _check_tensor("x", x, (None, None, None), op=op)
    b, L, d = x.shape
    _check_tensor("weight", weight, (d, None), op=op)
    w = weight.shape[1]
    _check(w >= 1, f"{op}: weight width must be >= 1")
    if bias is not None:
        _check_tensor("bias", bias, (d,), op=op)
    if seq_idx is not None:
        _check_tensor("seq_idx", seq_idx, (b, L), dtypes=(torch.int32,), op=op)
    if initial_states is not None:
        _check_tensor("initial_states", initial_states, (b, d, w - 1), op=op)
    _check(activation in (None, "silu"), lambda: f"{op}: activation must be 'silu' or None, got {activation!r}")
    impl = _within_kernel_limits(_choose(impl, x, weight, bias, seq_idx, initial_states, op=op), impl, w <= 4,
                                 f"{op}: the Triton kernel takes widths 1-4, got {w}")
    args = (x, weight, bias, seq_idx, initial_states, return_final_states, activation)
    if impl == "triton":
        from lit_mamba2.kernels import conv1d

        return conv1d.causal_conv1d(*args)
    return reference.causal_conv1d(*args)


def gated_rmsnorm(x, z, weight, eps=1e-5, group_size=None, norm_before_gate=False, *, impl=None):
    """RMSNorm over groups of channels, gated by silu(z). x, z: (..., dim); weight: (dim,)."""
    op = "gated_rmsnorm"
    _check(isinstance(x, torch.Tensor) and x.dim() >= 1, f"{op}: x must be a tensor with a last dimension")
    d = x.shape[-1]
    _check_tensor("weight", weight, (d,), op=op)
    if z is not None:
        _check_tensor("z", z, tuple(x.shape), op=op)
    gs = d if group_size is None else group_size
    _check(gs > 0 and d % gs == 0, lambda: f"{op}: dim {d} is not divisible by group_size {gs}")
    impl = _choose(impl, x, z, weight, op=op)
    if impl == "triton":
        from lit_mamba2.kernels import rmsnorm_gated

        return rmsnorm_gated.gated_rmsnorm(x, z, weight, eps, gs, norm_before_gate)
    return reference.gated_rmsnorm(x, z, weight, eps, gs, norm_before_gate)


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean", *, vocab_group=None,
                         impl=None):
    """Cross-entropy of the LM head's logits hidden @ weight.T against labels, without the full float32 logits
    on the Triton path. hidden: (N, d); weight: (V, d); labels: (N,). reduction "mean" or "sum".
    vocab_group: weight is this rank's slice of the vocabulary rows, split in rank order over that process group
    (tensor parallelism); the log-sum-exp is taken across the slices (lit_mamba2.parallel.tensor, in PyTorch on
    every device), the loss is the same on every rank and hidden's gradient is summed over the group."""
    op = "linear_cross_entropy"
    _check(reduction in ("mean", "sum"), lambda: f"{op}: reduction must be 'mean' or 'sum', got {reduction!r}")
    if vocab_group is not None:
        from lit_mamba2.parallel.tensor import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(hidden, weight, labels, ignore_index, reduction, vocab_group)
    if _choose(impl, hidden, weight, labels, op=op) == "triton":
        from lit_mamba2.kernels.cross_entropy import linear_cross_entropy as kernel

        # the kernel reads the label's logit unchecked; F.cross_entropy refuses such labels (on a GPU with a
        # device-side assert, as this is: no host sync)
        V = weight.shape[0]
        torch._assert_async(((labels == ignore_index) | ((labels >= 0) & (labels < V))).all(),
                            f"{op}: a label is outside [0, {V}) and not ignore_index ({ignore_index})")
        return kernel(hidden, weight, labels, ignore_index=ignore_index, reduction=reduction)
    return reference.linear_cross_entropy(hidden, weight, labels, ignore_index, reduction)


# ---------------------------------------------------------------------------------------------------------------
# One token per row: the recurrent step (the model's reference step) and the fused decode forms
# (lit_mamba2/inference). Shapes are checked by the callers, which build them; these run once per layer and token.
# ---------------------------------------------------------------------------------------------------------------
def conv_step(x, conv_state, weight, bias=None, activation="silu", *, impl=None):
    """One input of a depthwise causal conv: x (batch, dim); conv_state (batch, dim, width - 1), oldest first,
    shifted in place; weight (dim, width). Returns (batch, dim)."""
    if _choose(impl, x, conv_state, weight, bias, op="conv_step") == "triton":
        from lit_mamba2.kernels.state_update import conv_step as kernel

        return kernel(x, conv_state, weight, bias, activation)
    return reference.conv_step(x, conv_state, weight, bias, activation)


def ssm_step(state, x, dt, A_log, B, C, D=None, z=None, dt_bias=None, dt_limit=(0.0, INF), *, norm_weight=None,
             impl=None):
    """One token of the SSD recurrence (A = -exp(A_log), dt through softplus); `state` advances in place.
    See reference.ssm_step for the shapes and for norm_weight (the gated norm folded in)."""
    if _choose(impl, state, x, dt, A_log, B, C, D, z, dt_bias, op="ssm_step") == "triton":
        from lit_mamba2.kernels.state_update import state_update

        return state_update(state, x, dt, A_log, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                            dt_limit=dt_limit, A_is_log=True, norm_weight=norm_weight)
    return reference.ssm_step(state, x, dt, A_log, B, C, D, z, dt_bias, dt_limit, norm_weight)


def ring_mixer_step(state, conv_ring, slot, xBC, conv_weight, conv_bias, dt, A_log, D=None, z=None, dt_bias=None,
                    dt_limit=(0.0, INF), ngroups=1, *, norm_weight=None, impl=None):
    """A Mamba-2 mixer's conv (+ SiLU) on a ring of conv inputs and its SSM state update, for one token (one
    launch on the Triton path). conv_ring (batch, conv_dim, width): slot `slot` (0-dim int64) takes this token.
    Returns y (batch, nheads, headdim), or (u, sumsq) with norm_weight (see ssm_step)."""
    if _choose(impl, state, conv_ring, xBC, conv_weight, dt, A_log, op="ring_mixer_step") == "triton":
        from lit_mamba2.kernels.state_update import mixer_step

        return mixer_step(state, conv_ring, slot, xBC, conv_weight, conv_bias, dt, A_log, D=D, z=z,
                          dt_bias=dt_bias, dt_limit=dt_limit, ngroups=ngroups, norm_weight=norm_weight)
    b, h, p, n = state.shape
    xBC = reference.ring_conv_step(xBC, conv_ring, slot, conv_weight, conv_bias, "silu")
    x, B, C = torch.split(xBC, [h * p, ngroups * n, ngroups * n], dim=-1)
    return reference.ssm_step(state, x.view(b, h, p), dt, A_log, B.view(b, ngroups, n), C.view(b, ngroups, n), D,
                              z, dt_bias, dt_limit, norm_weight)


def add_rmsnorm(hidden, residual, weight, eps, residual_dtype, hidden_rms=None, *, impl=None):
    """residual' = residual + hidden (hidden alone when residual is None) in residual_dtype; returns
    (RMSNorm(residual'), residual'). hidden_rms = (sumsq, n, eps) scales a folded gated norm's output first."""
    if _choose(impl, hidden, residual, weight, op="add_rmsnorm") == "triton":
        from lit_mamba2.kernels.state_update import add_rmsnorm as kernel

        return kernel(hidden, residual, weight, eps, residual_dtype, hidden_rms=hidden_rms)
    return reference.add_rmsnorm(hidden, residual, weight, eps, residual_dtype, hidden_rms)


def add_norm_linear(hidden, residual, norm_weight, eps, weight, bias=None, residual_dtype=None, *, impl=None):
    """(linear(RMSNorm(residual + hidden)), residual + hidden) for one token per row, as one GEMV with the norm in
    its prologue on the Triton path (see reference.add_norm_linear for None hidden / residual)."""
    if _choose(impl, hidden, residual, weight, op="add_norm_linear") == "triton":
        from lit_mamba2.kernels.decode_linear import add_norm_linear as kernel

        return kernel(hidden, residual, norm_weight, eps, weight, bias, residual_dtype)
    return reference.add_norm_linear(hidden, residual, norm_weight, eps, weight, bias, residual_dtype)


def gated_norm_linear(y, z, norm_weight, eps, ngroups, norm_before_gate, weight, bias=None, residual=None, *,
                      impl=None):
    """linear(gated_rmsnorm(y, z)) for one token per row; with `residual`, residual += out in place."""
    if _choose(impl, y, z, weight, op="gated_norm_linear") == "triton":
        from lit_mamba2.kernels.decode_linear import gated_norm_linear as kernel

        return kernel(y, z, norm_weight, eps, ngroups, norm_before_gate, weight, bias, residual=residual)
    return reference.gated_norm_linear(y, z, norm_weight, eps, ngroups, norm_before_gate, weight, bias, residual)


def on_triton(impl, t: torch.Tensor) -> bool:
    """Whether ops called with `impl` on tensors like `t` run the Triton kernels (no argument checks)."""
    return impl == "triton" or (impl is None and t.is_cuda and t.dtype != torch.float64 and triton_available())


ATTENTION_IMPLS = IMPLS + ("flex",)


def attention(q, k, v, *, doc_q=None, doc_k=None, q_offset=None, scale=None, impl=None):
    """Causal attention within packed documents.

    q: (batch, heads, Lq, head_dim); k, v: (batch, heads_kv, Lk, head_dim) with heads % heads_kv == 0 (GQA) and
    Lq <= Lk. Query i sits at key position q_offset + i, 0 <= q_offset <= Lk - Lq; the default Lk - Lq makes the
    queries the last Lq keys (training: Lq == Lk; a prefill after a KV cache: Lk > Lq). A smaller offset is a slice of
    a longer row (a context-parallel shard starting at q_offset, given the row's keys): keys past a query's position
    are masked out. doc_q (batch, Lq), doc_k (batch, Lk): int32 document ids; query i sees key j iff
    j <= q_offset + i and doc_q[:, i] == doc_k[:, j]. One of them is enough: doc_q defaults to the queries' slice of
    doc_k, doc_k to doc_q when Lk == Lq; given both, they must agree there. Ids need not be sorted. Without either:
    plain causal attention. scale: the scores' factor, 1/sqrt(head_dim) by default. Returns (batch, heads, Lq,
    head_dim) in q's dtype.

    impl (ATTENTION_IMPLS): None picks "triton" for CUDA tensors that are not float64, "torch" otherwise.
    - "torch": the reference, SDPA with a dense boolean mask (is_causal where it is plain causal); any device, any
      float dtype.
    - "triton": the GPU path (kernels/attention.py), under the name the model's impl switch uses for every op:
      SDPA's flash kernel where no documents are given and the mask is plain causal, else flex attention under
      torch.compile, which inductor turns into Triton kernels. On CPU tensors it needs TRITON_INTERPRET=1, as the
      other ops do, and then runs flex attention eagerly, or the reference (with a warning, once) where autograd
      needs a backward: flex attention has none on CPU.
    - "flex": flex attention always, on any device: compiled on CUDA, eager elsewhere (tests, benchmarks).
    """
    op = "attention"
    _check_tensor("q", q, (None, None, None, None), op=op)
    b, h, Lq, d = q.shape
    _check_tensor("k", k, (b, None, None, d), op=op)
    hk, Lk = k.shape[1], k.shape[2]
    _check_tensor("v", v, (b, hk, Lk, d), op=op)
    _check(q.dtype == k.dtype == v.dtype,
           lambda: f"{op}: q, k and v must have one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    _check(b > 0 and Lq > 0 and d > 0, lambda: f"{op}: q must have batch, Lq and head_dim > 0, got {tuple(q.shape)}")
    _check(hk > 0 and h % hk == 0,
           lambda: f"{op}: heads (q's dim 1, {h}) must be divisible by heads_kv (k's dim 1, {hk})")
    _check(Lk >= Lq, lambda: f"{op}: k must have at least as many positions as q (Lk >= Lq), got Lk={Lk}, Lq={Lq}")
    if q_offset is None:
        q_offset = Lk - Lq
    _check(isinstance(q_offset, int) and not isinstance(q_offset, bool) and 0 <= q_offset <= Lk - Lq,
           lambda: f"{op}: q_offset must be an int in [0, Lk - Lq = {Lk - Lq}], got {q_offset!r}")
    _check(scale is None or (isinstance(scale, (int, float)) and not isinstance(scale, bool)),
           lambda: f"{op}: scale must be a number or None, got {scale!r}")
    if doc_q is not None:
        _check_tensor("doc_q", doc_q, (b, Lq), dtypes=(torch.int32,), op=op)
    if doc_k is not None:
        _check_tensor("doc_k", doc_k, (b, Lk), dtypes=(torch.int32,), op=op)
    if doc_k is None and doc_q is not None:
        _check(Lk == Lq, lambda: f"{op}: doc_k is needed when Lk ({Lk}) > Lq ({Lq}): the documents of the keys "
               "before the queries")
        doc_k = doc_q
    elif doc_q is None and doc_k is not None:
        doc_q = doc_k[:, q_offset:q_offset + Lq]
    elif doc_q is not None and not torch.compiler.is_compiling() and doc_q.device.type == "cpu":
        _check(bool((doc_q == doc_k[:, q_offset:q_offset + Lq]).all()),
               f"{op}: doc_q must equal doc_k at the queries' positions, doc_k[:, q_offset:q_offset + Lq]")
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"{op}: impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "flex":
        _one_device(q, k, v, doc_q, doc_k, op=op)
    else:
        impl = _choose(impl, q, k, v, doc_q, doc_k, op=op)
    if (impl == "triton" and q.device.type != "cuda" and torch.is_grad_enabled()
            and any(t.requires_grad for t in (q, k, v))):
        why = f"{op}: flex attention has no backward on {q.device.type}; running the reference (SDPA, dense mask)"
        if why not in _warned:
            _warned.add(why)
            warnings.warn(why)
        impl = "torch"
    if impl == "torch":
        return reference.attention(q, k, v, doc_q, doc_k, q_offset, scale)
    from lit_mamba2.kernels import attention as attention_kernels

    return attention_kernels.attention(q, k, v, doc_q, doc_k, q_offset, scale, always_flex=impl == "flex")
